"""Refresh hiding: the per-step time distribution of sync vs async root refreshes on a transformer LM.

Every configuration trains its own copy of the LM (same seed, same batches) with Shampoo refreshing
every ``FREQUENCY`` steps (``--quick``: a smoke run of the tiny LM every 10 steps), one configuration
after the other (an async worker still computing would otherwise slow the next configuration down). A
step is zero_grad + forward + backward + ``step()``.
With ``"sync"`` every refresh step carries the whole root computation and stands out as a spike; with
``"async"`` the roots are computed by the background worker during the next ``FREQUENCY`` steps (the
default lag) and the goal is ``p99/median ≤ GOAL``.

On CPU the worker needs cores of its own: ``"async"`` trains with ``threads − refresh_threads`` and
computes with ``refresh_threads``; ``"async, shared cores"`` trains with all of them, to show what
sharing costs. ``"sync"`` uses all of them for both. The control refreshes only at step 1 and trains
like ``"async"``: its ``p99/median`` is the machine's own step-time noise. On CUDA training runs on the
GPU and the roots on the host CPU, the paper's setting.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lightning_shampoo import Shampoo

from .harness import progress, synchronize
from .models import lm_workload

NAME = "refresh_hiding"
FREQUENCY = 50
GOAL = 1.25


@dataclass(frozen=True)
class Config:
    label: str
    refresh: str
    train_threads: int
    refresh_threads: int
    refreshing: bool = True  # False: roots once, at step 1 (the control)


def configurations(threads: int, device: torch.device) -> list[Config]:
    """Sync, async with the worker on cores of its own (on CPU also sharing the training's), the control."""
    if device.type == "cuda":
        worker = max(1, threads - 1)  # one core drives the GPU
        train = threads
    else:
        worker = max(1, threads // 4)
        train = max(1, threads - worker)
    configs = [Config("sync", "sync", threads, threads), Config("async", "async", train, worker)]
    if train < threads:
        configs.append(Config("async, shared cores", "async", threads, worker))
    return [*configs, Config("control: no refresh after step 1", "sync", train, worker, refreshing=False)]


def _measure(
    config: Config, quick: bool, device: torch.device, frequency: int, steps: int, warmup: int
) -> dict[str, Any]:
    """One configuration's step times: ``warmup`` untimed steps (state, first refresh), then ``steps``."""
    torch.set_num_threads(config.train_threads)
    workload = lm_workload(quick, device)
    batches = workload.batches(torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = workload.build()
    optimizer = Shampoo(
        model.parameters(),
        precondition_frequency=frequency,
        start_preconditioning_step=1,
        refresh=config.refresh,
        refresh_threads=config.refresh_threads,
        refresh_policy=None if config.refreshing else (lambda step: step == 1),
    )
    times = []
    with optimizer:
        for i in range(warmup + steps):
            synchronize(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            workload.loss(model, batches[i % len(batches)]).backward()
            optimizer.step()
            synchronize(device)
            times.append(time.perf_counter() - start)
        metrics = optimizer.metrics()
    timed = times[warmup:]
    # Steps count from 1; refreshes are at 1, 1 + frequency, …
    refresh_steps = [t for i, t in enumerate(timed) if (warmup + i) % frequency == 0]
    median = statistics.median(timed)
    p99 = statistics.quantiles(timed, n=100, method="inclusive")[98]
    progress(
        NAME,
        f"{config.label}: median {1e3 * median:.1f} ms, p99 {1e3 * p99:.1f} ms, "
        f"max {1e3 * max(timed):.1f} ms, blocked on roots {metrics['wait_s']:.2f} s",
    )
    return {
        **asdict(config),
        "median_ms": 1e3 * median,
        "p99_ms": 1e3 * p99,
        "max_ms": 1e3 * max(timed),
        "mean_ms": 1e3 * statistics.fmean(timed),
        "p99_over_median": p99 / median,
        "max_over_median": max(timed) / median,
        "refresh_step_median_ms": 1e3 * statistics.median(refresh_steps),
        "steps": len(timed),
        "step_ms": [1e3 * t for t in timed],
        "refreshes_timed": len(refresh_steps),
        "metrics": metrics,
    }


def run(quick: bool, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Measure every configuration; ``quick``: the tiny LM and two refresh periods (a smoke run).

    Returns the per-configuration figures (ms) and the goal's verdict, as plain JSON-able values.
    """
    device = torch.device(device)
    threads = torch.get_num_threads()
    frequency, periods = (10, 2) if quick else (FREQUENCY, 4)
    # The warm-up covers the lazy state and the first refresh (step 1); any `frequency` consecutive timed
    # steps hold one refresh step.
    warmup = 3 if quick else 10
    load_before = os.getloadavg()[0]
    try:
        runs = [
            _measure(config, quick, device, frequency, periods * frequency, warmup)
            for config in configurations(threads, device)
        ]
    finally:
        torch.set_num_threads(threads)
    by_label = {r["label"]: r for r in runs}
    sync, hidden, control = by_label["sync"], by_label["async"], runs[-1]
    return {
        "name": NAME,
        "workload": lm_workload(quick, device).description,
        "device": str(device),
        "threads": threads,
        "frequency": frequency,
        "load_average_1m": [load_before, os.getloadavg()[0]],
        "runs": runs,
        "goal": {
            "async_p99_over_median": hidden["p99_over_median"],
            "target": GOAL,
            "met": hidden["p99_over_median"] <= GOAL,
            "sync_refresh_step_over_median": sync["refresh_step_median_ms"] / sync["median_ms"],
            "control_p99_over_median": control["p99_over_median"],
        },
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv, "cuda" if "--cuda" in sys.argv else "cpu"), indent=2))
