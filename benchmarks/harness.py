"""What every figure shares: the run settings, the result records, timing and progress output."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """One benchmark run: ``quick`` picks tiny sizes; every figure uses the same thread count."""

    quick: bool
    threads: int
    device: torch.device
    out_dir: Path
    seed: int = 0


@dataclass
class Table:
    """A markdown table: ``rows`` hold plain numbers and strings (rendered by :mod:`report`)."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class FigureResult:
    """What one figure produced; ``data`` carries the raw numbers for ``results.json``."""

    name: str
    title: str
    status: str = "done"
    tables: list[Table] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)  # filled in by the runner: see machine_info


def progress(figure: str, message: str) -> None:
    """One line per measurement, flushed at once so a long run shows where it is."""
    print(f"[{figure}] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timings cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Seconds one call of ``fn`` takes, device work included, and what it returned."""
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return time.perf_counter() - start, value


def time_median(fn: Callable[[], T], device: torch.device, repeats: int) -> tuple[float, T]:
    """Median seconds of ``repeats`` calls of ``fn``, and what the first call returned."""
    calls = [timed(fn, device) for _ in range(repeats)]
    return median([seconds for seconds, _ in calls]), calls[0][1]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values))


def machine_info(settings: Settings) -> dict[str, Any]:
    """Where and when the numbers were taken: recorded with every figure."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": settings.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(settings.device),
        "quick": settings.quick,
        # Other processes compete for the cores: side-by-side ratios suffer less than absolute times.
        "load_average_1m": os.getloadavg()[0],
    }
    if settings.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(settings.device)
    return info


def goal_verdict(measured: float, goal: float, *, at_most: bool) -> str:
    """``met`` or ``missed by N×`` for a goal ``measured ≤ goal`` (``at_most``) or ``measured ≥ goal``."""
    if at_most:
        return "met" if measured <= goal else f"missed by {measured / goal:.2f}×"
    if measured >= goal:
        return "met"
    return f"missed by {goal / measured:.2f}×" if measured > 0 else "missed"
