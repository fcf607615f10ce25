"""Figure 3: refresh hiding, the per-step time distribution of sync vs async root refreshes on the LM.

Every configuration trains its own copy of the transformer LM (same seed, same batches) with Shampoo
refreshing every ``frequency`` steps, one configuration after the other (an async worker still computing
would otherwise slow the next configuration down). A step is zero_grad + forward + backward + ``step()``.
Shampoo blocks dims at ``BLOCK_SIZE``, and on CPU the LM's batches are cut to ``CPU_SEQUENCES``
sequences: a refresh then costs about seven steps' time, one round of a configuration about ten seconds,
and the worker needs a small share of a core to finish within the lag (the default block size would make a
refresh cost ~15 steps, which a niced worker on a loaded 2-core machine does not finish in time).
With ``"sync"`` every refresh step carries the whole root computation and stands out as a spike; with
``"async"`` the roots are computed by the background worker during the next ``frequency`` steps (the
default lag) and the goal (issue 3) is ``p99/median ≤ GOAL``.

On CPU the worker needs cores of its own: ``"async"`` trains with ``threads − refresh_threads`` and
computes with ``refresh_threads``; ``"async, shared cores"`` trains with all of them, to show what
sharing costs. ``"sync"`` uses all of them for both. The control refreshes only at step 1 and trains
like ``"async"``: its ``p99/median`` is the machine's own step-time noise.

On a shared machine that noise comes and goes (two or three stray slow steps in a hundred decide a p99),
so the configurations are measured in ``rounds``, one after the other within each round, and every figure
is the median over the rounds, with the spread of ``p99/median`` beside it. On CUDA
(``python -m benchmarks.run --only refresh_hiding --device cuda``) training runs on the GPU and the
roots on the host CPU, the paper's setting.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.axis import Axis
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from lightning_shampoo import Shampoo

from . import report
from .harness import FigureResult, Settings, Table, goal_verdict, progress, timed
from .models import Batch, Workload, lm_workload

NAME = "refresh_hiding"
GOAL = 1.25  # async p99/median
CPU_SEQUENCES = 8
BLOCK_SIZE = 512


@dataclass(frozen=True)
class Plan:
    """Per round and configuration: ``warmup`` untimed steps, then ``periods`` refresh periods."""

    frequency: int
    periods: int
    rounds: int

    @property
    def warmup(self) -> int:
        """Steps 1…frequency: lazy state, the first refresh (installed at once in every mode) and, for
        async, the steps before its first lagged install at step 1 + frequency (the default lag)."""
        return self.frequency

    @property
    def steps(self) -> int:
        return self.frequency * self.periods


FULL = Plan(frequency=50, periods=2, rounds=3)
QUICK = Plan(frequency=10, periods=2, rounds=1)


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


def is_refresh_step(step: int, frequency: int) -> bool:
    """Steps count from 1; the default policy refreshes at 1, 1 + frequency, …"""
    return step % frequency == 1 % frequency


def distribution(step_s: list[float], first_step: int, frequency: int) -> dict[str, float]:
    """Median, mean, p99, max (ms) of the steps ``first_step, first_step + 1, …``, and the refresh steps'
    median. The mean is the throughput: refreshes included."""
    refresh = [t for i, t in enumerate(step_s) if is_refresh_step(first_step + i, frequency)]
    median = statistics.median(step_s)
    p99 = statistics.quantiles(step_s, n=100, method="inclusive")[98]
    return {
        "median_ms": 1e3 * median,
        "mean_ms": 1e3 * statistics.fmean(step_s),
        "p99_ms": 1e3 * p99,
        "max_ms": 1e3 * max(step_s),
        "p99_over_median": p99 / median,
        "refresh_step_median_ms": 1e3 * statistics.median(refresh),
        "refresh_step_over_median": statistics.median(refresh) / median,
        "refreshes_timed": len(refresh),
    }


def _measure(
    config: Config, workload: Workload, batches: list[Batch], plan: Plan, settings: Settings, round_: int
) -> dict[str, Any]:
    """One configuration's step times in one round: ``plan.warmup`` untimed steps, then ``plan.steps``."""
    torch.set_num_threads(config.train_threads)
    torch.manual_seed(settings.seed)
    model = workload.build()
    optimizer = Shampoo(
        model.parameters(),
        block_size=BLOCK_SIZE,
        precondition_frequency=plan.frequency,
        start_preconditioning_step=1,
        refresh=config.refresh,
        refresh_threads=config.refresh_threads,
        refresh_policy=None if config.refreshing else (lambda step: step == 1),
    )

    def train_step(batch: Batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        workload.loss(model, batch).backward()
        optimizer.step()

    with optimizer:
        step_s = [timed(lambda i=i: train_step(batches[i % len(batches)]), settings.device)[0]
                  for i in range(plan.warmup + plan.steps)]
        metrics = optimizer.metrics()
    measured = step_s[plan.warmup:]
    figures = distribution(measured, plan.warmup + 1, plan.frequency)
    progress(NAME, f"round {round_ + 1}/{plan.rounds}, {config.label}: median {figures['median_ms']:.1f} ms, "
                   f"p99 {figures['p99_ms']:.1f} ms, max {figures['max_ms']:.1f} ms, "
                   f"blocked on roots {metrics['wait_s']:.2f} s")
    return {**figures, "wait_s": metrics["wait_s"], "latency_s": metrics["refresh_latency_mean_s"],
            "metrics": metrics, "step_ms": [round(1e3 * t, 3) for t in measured]}


def summarize(config: Config, rounds: list[dict[str, Any]], frequency: int) -> dict[str, Any]:
    """A configuration's figures over its rounds: medians, the spread of ``p99/median``, the worst wait."""
    ratios = [r["p99_over_median"] for r in rounds]
    keys = ("median_ms", "mean_ms", "p99_ms", "p99_over_median", "refresh_step_over_median", "latency_s")
    summary = {key: statistics.median(r[key] for r in rounds) for key in keys}
    return {**asdict(config), **summary,
            "max_ms": max(r["max_ms"] for r in rounds),
            "p99_over_median_min": min(ratios), "p99_over_median_max": max(ratios),
            "wait_s": max(r["wait_s"] for r in rounds),
            "lag_window_s": frequency * summary["median_ms"] / 1e3,
            "rounds": rounds}


def _batches(workload: Workload, settings: Settings) -> tuple[list[Batch], str]:
    """The LM's batches (cut to ``CPU_SEQUENCES`` sequences on CPU) and their description."""
    batches = workload.batches(torch.Generator().manual_seed(settings.seed))
    sequences, seq = batches[0][0].shape
    if settings.device.type == "cuda" or sequences <= CPU_SEQUENCES:
        return batches, workload.description
    cut = [(tokens[:CPU_SEQUENCES], targets[:CPU_SEQUENCES]) for tokens, targets in batches]
    per_step = CPU_SEQUENCES * seq
    return cut, f"{workload.description}; cut to {CPU_SEQUENCES} sequences ({per_step} tokens/step)"


def run(settings: Settings) -> FigureResult:
    plan = QUICK if settings.quick else FULL
    workload = lm_workload(settings.quick, settings.device)
    batches, description = _batches(workload, settings)
    threads = torch.get_num_threads()
    progress(NAME, f"{description} on {settings.device}: {plan.rounds} round(s) of {plan.warmup} warm-up + "
                   f"{plan.steps} timed steps per configuration, refresh every {plan.frequency}")
    configs = configurations(threads, settings.device)
    try:
        # Round-major, so every configuration samples the machine's load at several moments.
        rounds = [[_measure(config, workload, batches, plan, settings, r) for config in configs]
                  for r in range(plan.rounds)]
    finally:
        torch.set_num_threads(threads)
    runs = [summarize(config, [measured[i] for measured in rounds], plan.frequency)
            for i, config in enumerate(configs)]
    result = FigureResult(NAME, "Refresh hiding: step-time distribution, sync vs async root refresh")
    result.tables.append(_table(runs, description, plan))
    result.plots.append(_plot(runs, plan, settings))
    result.data = {"workload": description, "device": str(settings.device), "threads": threads,
                   "block_size": BLOCK_SIZE, "plan": asdict(plan), "goal": GOAL, "runs": runs}
    return result


def goal_cell(run: dict[str, Any]) -> str:
    """The verdict of issue 3's goal for an async run; the other configurations have none."""
    if run["refresh"] != "async":
        return ""
    return f"p99/median ≤{GOAL:g}: {goal_verdict(run['p99_over_median'], GOAL, at_most=True)}"


def _table(runs: list[dict[str, Any]], description: str, plan: Plan) -> Table:
    table = Table(
        f"Step time (ms) per configuration: {description}; block_size {BLOCK_SIZE}, refresh every "
        f"{plan.frequency} steps",
        ["configuration", "train threads", "refresh threads", "median", "mean", "p99", "max", "p99/median",
         "p99/median per round", "refresh step / median", "roots ready after s", "lag window s",
         "blocked on roots s", "goal"],
    )
    for r in runs:
        window = r["lag_window_s"] if r["refresh"] == "async" else None
        table.rows.append([r["label"], r["train_threads"], r["refresh_threads"], r["median_ms"], r["mean_ms"],
                           r["p99_ms"], r["max_ms"], r["p99_over_median"], spread(r),
                           r["refresh_step_over_median"], r["latency_s"], window, r["wait_s"], goal_cell(r)])
    table.notes += [
        f"{plan.rounds} round(s); per round and configuration {plan.steps} timed steps ({plan.periods} "
        f"refresh periods, {plan.periods} refresh steps) after {plan.warmup} warm-up steps; a step is "
        "zero_grad + forward + backward + step(). Every figure is the median over the rounds (max: the "
        "largest step of all; blocked on roots: the worst round). refresh step / median: the median of the "
        "steps that start a refresh over the median step, the sync spike; blocked on roots: the time step() "
        "waited for root computation, warm-up included.",
        "async installs the roots of step t at step t + frequency (the default lag): it waits (blocked on "
        "roots) when they take longer (roots ready after: mean seconds from snapshot to roots) than the lag "
        "window (frequency × the median step). The worker runs niced below training, so on a machine "
        "whose other jobs take the cores it is the first to wait. The control refreshes at step 1 only: "
        "its p99/median is the machine's own noise, the floor for async.",
    ]
    return table


def spread(run: dict[str, Any]) -> str:
    """``min–max`` of ``p99/median`` over the rounds."""
    return f"{run['p99_over_median_min']:.2f}–{run['p99_over_median_max']:.2f}"


def _plot(runs: list[dict[str, Any]], plan: Plan, settings: Settings) -> str:
    fig, (trace, histogram) = report.subplots(1, 2, width=12.0, height=4.2)
    steps = range(plan.warmup + 1, plan.warmup + plan.steps + 1)
    for r in runs:
        trace.plot(steps, r["rounds"][0]["step_ms"], lw=0.9, label=r["label"])
    for step in steps:
        if is_refresh_step(step, plan.frequency):
            trace.axvline(step, color="grey", ls=":", lw=0.8)
    trace.set_yscale("log")
    _log_ticks(trace.yaxis)
    trace.set_xlabel("step of round 1 (dotted: refresh steps)")
    trace.set_ylabel("step time (ms)")
    trace.legend(fontsize=8)
    pooled = {r["label"]: [t for measured in r["rounds"] for t in measured["step_ms"]] for r in runs}
    every = [t for step_ms in pooled.values() for t in step_ms]
    bins = np.geomspace(min(every), max(every) * 1.001, 40)
    for label, step_ms in pooled.items():
        histogram.hist(step_ms, bins=bins, histtype="step", lw=1.2, label=label)
    histogram.set_xscale("log")
    _log_ticks(histogram.xaxis)
    histogram.set_yscale("log")
    histogram.set_xlabel("step time (ms)")
    histogram.set_ylabel(f"steps (all {plan.rounds} rounds)")
    histogram.set_title(f"{settings.device}, refresh every {plan.frequency} steps")
    return report.save(fig, settings.out_dir, f"{NAME}.png")


def _log_ticks(axis: Axis) -> None:
    """A log axis labelled 100, 200, 500, 1000, … (the default 3×10² labels overlap)."""
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())
