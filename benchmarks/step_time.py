"""Figure 1: optimizer-step and whole-iteration time as ratios to AdamW, next to the flop-model bound.

Every configuration gets its own copy of the model (same seed, same batches) and all of them stay
alive for the whole measurement. After a warm-up (lazy state, and for a refreshing configuration up to
the step before its second refresh: the first installs at once in every mode, an async step waiting), the
configurations take turns: each round runs a stretch of timed iterations of one configuration, then the
next, so drift of the machine hits all of them alike. A round ends by waiting for background refresh
work still running (``Shampoo.drain``), counted in its last step: the work is charged to the
configuration that made it, never to the one timed next.

"mean" below is the median over windows of the mean step time, a window being whole refresh periods of
consecutive timed steps starting at a refresh, so it carries its share of root refreshes; "median" is
the median over every timed step (a step without a refresh). A configuration refreshing every 10 steps
(and AdamW) runs ``round_steps`` steps a round, so each round is a window; one refreshing every 100
steps runs 100/``rounds`` steps a round (rounded up), and its rounds together make one window.

Full plans: MLP 4 rounds of 20 steps, the LM 3 rounds of 20 (the f100 configurations: 100 timed steps
each), after 10 warm-up steps (to the second refresh for the refreshing ones): three to four and a half
minutes on two CPU cores with the peers, depending on the load. A configuration's per-round medians
agree to about 10% (see the progress lines; load drift moves all configurations of a round alike), so
60–100 timed steps settle its median. The 8k-token LM (``lm_8k``) times AdamW and Shampoo only, 3 rounds
of 10 steps after 5 warm-up steps: about a minute and a half more. The earlier plan (2–3 rounds of 100
steps, and a d_model-256 LM) took 23 minutes without the peers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim import Optimizer

from . import optimizers, report
from .flops import BLOCKING, forward_backward_flops, shampoo_step_flops
from .harness import FigureResult, Settings, Table, goal_verdict, mean, median, progress, synchronize
from .models import WORKLOADS, Batch, Workload, lm_8k_workload
from .optimizers import OptimizerSpec

NAME = "step_time"
FREQUENCIES = (10, 100)
# The peers run at one frequency only (time): our default, that of issue 2's goal and the README.
PEER_FREQUENCY = 100
# What storage and the preconditioner cost per step (sync, at PEER_FREQUENCY): label suffix → options.
VARIANTS = {
    "bf16": {"factor_dtype": torch.bfloat16},
    "EC": {"preconditioner": "eigenvalue_corrected"},
    "EC bf16": {"preconditioner": "eigenvalue_corrected", "factor_dtype": torch.bfloat16},
}
# Issue 2's target: on the MLP, Shampoo's step at frequency 100 within this multiple of AdamW's.
MLP_STEP_GOAL = 11.0
# Issue 6's goal: measured iteration ratio within this factor of the flop-model bound.
BOUND_GOAL = 1.15
# Issue 12's goal: the MLP's slowest (refresh) step at frequency 10 within half the 450 ms it took before.
SLOWEST_STEP_GOAL_MS = 225.0
# Issue 12's goal on the convergence figure's 8k-token task: the iteration at frequency 100 within this
# multiple of AdamW's (the lm_8k workload: AdamW and Shampoo at both frequencies only, for time).
LM_8K_ITERATION_GOAL = 1.15


@dataclass(frozen=True)
class Plan:
    """How long to time one workload: untimed warm-up steps, then ``rounds`` rounds of ``round_steps``.

    With ``whole_periods`` a configuration whose refresh period is longer than ``round_steps`` runs
    ``period / rounds`` steps a round instead, so that its rounds add up to a whole period (see the module
    docstring); ``round_steps`` must then be a multiple of every shorter period.
    """

    warmup: int
    rounds: int
    round_steps: int
    whole_periods: bool = True

    def warmup_steps(self, spec: OptimizerSpec) -> int:
        """``warmup``, or for a refreshing configuration the steps before its first steady refresh.

        Its timing then starts at a refresh step, so a window is [refresh, next refresh) and no
        background refresh straddles two windows.
        """
        return spec.steady_after - 1 if spec.refresh_period else self.warmup

    def steps_per_round(self, spec: OptimizerSpec) -> int:
        period = spec.refresh_period
        if not self.whole_periods or period <= self.round_steps:
            return self.round_steps
        return math.ceil(period / self.rounds)

    def window(self, spec: OptimizerSpec) -> int:
        """Consecutive timed steps averaged into one "mean" sample."""
        return max(self.steps_per_round(spec), spec.refresh_period if self.whole_periods else 0)


FULL_PLANS = {
    "mlp": Plan(warmup=10, rounds=4, round_steps=20),
    "lm": Plan(warmup=10, rounds=3, round_steps=20),
    "lm_8k": Plan(warmup=5, rounds=3, round_steps=10),
}
# A smoke run: too short for whole refresh periods.
QUICK_PLANS = {
    "mlp": Plan(warmup=2, rounds=2, round_steps=3, whole_periods=False),
    "lm": Plan(warmup=2, rounds=2, round_steps=2, whole_periods=False),
    "lm_8k": Plan(warmup=2, rounds=2, round_steps=2, whole_periods=False),
}


@dataclass
class Run:
    """One configuration's live model, optimizer and timings (seconds per step, in order)."""

    spec: OptimizerSpec
    warmup: int = 0
    model: nn.Module | None = None
    optimizer: Optimizer | None = None
    step_s: list[float] = field(default_factory=list)
    iteration_s: list[float] = field(default_factory=list)
    forward_backward_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.optimizer is not None and not self.error

    @property
    def status(self) -> str:
        """Why the run has no timings: the failure, or why the configuration could not be built."""
        return f"failed: {self.error}" if self.error else self.spec.unavailable


def configurations() -> list[OptimizerSpec]:
    """AdamW, Shampoo at each frequency and refresh mode, the :data:`VARIANTS` at the peers' frequency, and
    the peers at matched settings."""
    specs = [optimizers.adamw()]
    for frequency in FREQUENCIES:
        specs += [optimizers.shampoo(frequency, refresh=mode) for mode in optimizers.refresh_modes()]
    specs += [optimizers.shampoo(PEER_FREQUENCY, label=f"Shampoo f{PEER_FREQUENCY} {name}", **options)
              for name, options in VARIANTS.items()]
    return specs + optimizers.peers(PEER_FREQUENCY)


def iteration_configurations() -> list[OptimizerSpec]:
    """AdamW and sync Shampoo at each frequency: what the 8k-token workload's iteration goal needs."""
    return [optimizers.adamw(), *(optimizers.shampoo(frequency) for frequency in FREQUENCIES)]


# The timed workloads and what runs on each.
TIMED = (*((make, configurations) for make in WORKLOADS), (lm_8k_workload, iteration_configurations))


def _iteration(run: Run, batch: Batch, workload: Workload, device: torch.device) -> tuple[float, float]:
    """One timed zero_grad + forward + backward + step: (forward+backward seconds, step seconds)."""
    assert run.model is not None and run.optimizer is not None
    synchronize(device)
    start = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    workload.loss(run.model, batch).backward()
    synchronize(device)
    middle = time.perf_counter()
    run.optimizer.step()
    synchronize(device)
    return middle - start, time.perf_counter() - middle


def _fail(run: Run, workload: Workload, exc: Exception) -> None:
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    run.error = f"{type(exc).__name__}: {first_line}"
    progress(NAME, f"{workload.name} | {run.spec.label}: failed ({run.error})")


def _start(run: Run, workload: Workload, batches: list[Batch], plan: Plan, settings: Settings) -> None:
    """Build the model and optimizer and run the warm-up; a failure is recorded in ``run``."""
    if run.spec.factory is None:
        progress(NAME, f"{workload.name} | {run.spec.label}: {run.spec.unavailable}")
        return
    torch.manual_seed(settings.seed)
    run.model = workload.build()
    try:
        run.optimizer = run.spec.factory(run.model.parameters())
        run.warmup = plan.warmup_steps(run.spec)
        for i in range(run.warmup):
            _iteration(run, batches[i % len(batches)], workload, settings.device)
    except Exception as exc:  # a peer's failure is reported in its row, not fatal to the figure
        _fail(run, workload, exc)


def _round(run: Run, workload: Workload, batches: list[Batch], steps: int, device: torch.device) -> None:
    """``steps`` timed iterations, then the drain of background work, charged to the last step."""
    assert run.optimizer is not None
    fbs, step_times = [], []
    for i in range(steps):
        fb, step = _iteration(run, batches[i % len(batches)], workload, device)
        fbs.append(fb)
        step_times.append(step)
    synchronize(device)
    start = time.perf_counter()
    optimizers.drain(run.optimizer)
    step_times[-1] += time.perf_counter() - start
    run.forward_backward_s += fbs
    run.step_s += step_times
    run.iteration_s += [fb + step for fb, step in zip(fbs, step_times, strict=True)]


def measure(workload: Workload, specs: list[OptimizerSpec], plan: Plan, settings: Settings) -> list[Run]:
    """Time every configuration on ``workload`` side by side (see the module docstring)."""
    batches = workload.batches(torch.Generator().manual_seed(settings.seed))
    runs = [Run(spec) for spec in specs]
    for run in runs:
        _start(run, workload, batches, plan, settings)
    for round_index in range(plan.rounds):
        for run in runs:
            if not run.ok:
                continue
            steps = plan.steps_per_round(run.spec)
            try:
                _round(run, workload, batches, steps, settings.device)
            except Exception as exc:  # as in the warm-up
                _fail(run, workload, exc)
                continue
            progress(
                NAME,
                f"{workload.name} | {run.spec.label} | round {round_index + 1}/{plan.rounds}: "
                f"step mean {1e3 * mean(run.step_s[-steps:]):.2f} ms, "
                f"median {1e3 * median(run.step_s[-steps:]):.2f} ms; "
                f"iteration mean {1e3 * mean(run.iteration_s[-steps:]):.2f} ms",
            )
    for run in runs:
        if run.optimizer is not None:
            optimizers.close(run.optimizer)
    return runs


def window_means(times: list[float], window: int) -> list[float]:
    """Means of consecutive whole windows of ``times`` (all of them when shorter than one window)."""
    whole = [times[i : i + window] for i in range(0, len(times) - window + 1, window)]
    return [mean(w) for w in whole] or [mean(times)]


def _times_ms(run: Run, window: int) -> dict[str, float]:
    return {
        "step_mean_ms": 1e3 * median(window_means(run.step_s, window)),
        "step_median_ms": 1e3 * median(run.step_s),
        "step_max_ms": 1e3 * max(run.step_s),
        "iteration_mean_ms": 1e3 * median(window_means(run.iteration_s, window)),
        "iteration_median_ms": 1e3 * median(run.iteration_s),
    }


def _summary(run: Run, baseline: Run, plan: Plan) -> dict[str, float]:
    """Milliseconds per step of ``run`` and their ratios to ``baseline``'s (AdamW's)."""
    mine, base = _times_ms(run, plan.window(run.spec)), _times_ms(baseline, plan.window(baseline.spec))
    ratios = {key.replace("_ms", "_ratio"): value / base[key] for key, value in mine.items()}
    return {**mine, "forward_backward_median_ms": 1e3 * median(run.forward_backward_s),
            "timed_steps": len(run.step_s), **ratios}


def _bound(workload: Workload, spec: OptimizerSpec, model: nn.Module, summary: dict[str, float],
           baseline_fb_ms: float) -> dict[str, float]:
    """Flop-model bound for a Shampoo run: iteration ratio ``1 + F_opt/F_fb`` and step time ``F_opt/rate``.

    ``rate`` is the flop rate AdamW's forward+backward achieved, so the step bound assumes Shampoo's
    matmuls run as fast as the model's own.
    """
    params = list(model.parameters())
    options = {key: spec.options[key] for key in BLOCKING if key in spec.options}
    opt_flops = shampoo_step_flops(params, spec.options.get("preconditioner", "root_inverse"), **options)
    fb_flops = forward_backward_flops(params, workload.tokens)
    iteration_bound = 1.0 + opt_flops / fb_flops
    step_bound_ms = opt_flops / fb_flops * baseline_fb_ms
    return {
        "optimizer_gflop": opt_flops / 1e9,
        "forward_backward_gflop": fb_flops / 1e9,
        "iteration_ratio_bound": iteration_bound,
        "iteration_mean_over_bound": summary["iteration_mean_ratio"] / iteration_bound,
        "iteration_median_over_bound": summary["iteration_median_ratio"] / iteration_bound,
        "step_bound_ms": step_bound_ms,
        "step_mean_over_bound": summary["step_mean_ms"] / step_bound_ms,
    }


def _timing_table() -> Table:
    return Table(
        "Step and iteration time (ms per step) and ratios to AdamW",
        ["workload", "optimizer", "step mean", "step median", "step max", "step ×AdamW (mean)",
         "step ×AdamW (median)", "iteration mean", "iteration median", "iter ×AdamW (mean)",
         "iter ×AdamW (median)", "goal / status"],
        notes=[
            "mean: median over windows of whole refresh periods (f10 configurations and AdamW: each round; "
            "f100: its 100 timed steps) of the mean step time, so it includes the amortised root refreshes; "
            "background refresh work left at a round's end is waited for and counted in that round. "
            "median: median over all timed steps (a step without a refresh).",
            f"Goal (issue 2): on the MLP, Shampoo's step at frequency 100 ≤ {MLP_STEP_GOAL:g}× AdamW's, "
            "judged on the mean (refreshes included). Goals (issue 12): on the MLP at frequency 10, the "
            f"slowest step (max) ≤ {SLOWEST_STEP_GOAL_MS:g} ms; on lm_8k (the convergence figure's "
            f"8,192-token batch) at frequency 100, the iteration (mean) ≤ {LM_8K_ITERATION_GOAL:g}× AdamW's.",
            f"Peers (optional `bench` extra) at frequency {PEER_FREQUENCY}, with the settings of Shampoo "
            f"f{PEER_FREQUENCY} (lr 1e-3, block size, start step, ε, betas, graft) passed as follows:",
            *[f"{entry.title}: {entry.notes}" for entry in optimizers.PEERS],
        ],
    )


def _bound_table() -> Table:
    return Table(
        "Flop-model lower bound (statistics + preconditioning vs 6·tokens·params forward+backward)",
        ["workload", "optimizer", "Shampoo GFLOP/step", "fwd+bwd GFLOP", "iter ratio bound",
         "measured/bound (mean)", "measured/bound (median)", f"goal ≤{BOUND_GOAL:g}×", "step bound ms",
         "step measured/bound"],
        notes=[
            "iter ratio bound = 1 + F_Shampoo/F_fwd+bwd: the iteration-time ratio to AdamW if Shampoo's "
            "matmuls ran at the model's flop rate and everything else were free; root refreshes are not in "
            "the model. measured/bound below 1 means Shampoo's matmuls ran faster than the model's.",
            "step bound ms = F_Shampoo / (flop rate of AdamW's forward+backward); step measured/bound uses "
            "the mean.",
        ],
    )


def _goal(workload: Workload, spec: OptimizerSpec, summary: dict[str, float]) -> str:
    if workload.name == "lm_8k" and spec.options.get("precondition_frequency") == 100:
        verdict = goal_verdict(summary["iteration_mean_ratio"], LM_8K_ITERATION_GOAL, at_most=True)
        return f"iteration ≤{LM_8K_ITERATION_GOAL:g}× AdamW: {verdict}"
    if workload.name != "mlp" or spec.kind != "shampoo":
        return ""
    if spec.options["precondition_frequency"] == 10:
        verdict = goal_verdict(summary["step_max_ms"], SLOWEST_STEP_GOAL_MS, at_most=True)
        return f"slowest step ≤{SLOWEST_STEP_GOAL_MS:g} ms: {verdict}"
    if spec.options["precondition_frequency"] != 100:
        return ""
    verdict = goal_verdict(summary["step_mean_ratio"], MLP_STEP_GOAL, at_most=True)
    return f"step ≤{MLP_STEP_GOAL:g}× AdamW: {verdict}"


def _report(workload: Workload, runs: list[Run], plan: Plan, timing: Table, bound: Table,
            plot_rows: list[tuple[str, str, float, float, float | None]]) -> dict[str, object]:
    """Rows of both tables and the plot for one workload; returns the records of its runs."""
    baseline = runs[0]
    records: dict[str, dict[str, object]] = {}
    missing: dict[str, list[str]] = {}
    for item in runs:
        label = item.spec.label
        if not item.ok:
            records[label] = {"unavailable": item.status, "options": item.spec.options}
            missing.setdefault(item.status, []).append(label)
            continue
        summary = _summary(item, baseline, plan)
        timing.rows.append([
            workload.name, label, summary["step_mean_ms"], summary["step_median_ms"], summary["step_max_ms"],
            summary["step_mean_ratio"], summary["step_median_ratio"], summary["iteration_mean_ms"],
            summary["iteration_median_ms"], summary["iteration_mean_ratio"],
            summary["iteration_median_ratio"], _goal(workload, item.spec, summary),
        ])
        records[label] = {"options": item.spec.options, "warmup_steps": item.warmup, **summary}
        iteration_bound = None
        if item.spec.kind == "shampoo":
            assert item.model is not None
            baseline_fb_ms = 1e3 * median(baseline.forward_backward_s)
            flops = _bound(workload, item.spec, item.model, summary, baseline_fb_ms)
            records[label]["flop_model"] = flops
            iteration_bound = flops["iteration_ratio_bound"]
            bound.rows.append([
                workload.name, label, flops["optimizer_gflop"], flops["forward_backward_gflop"],
                iteration_bound, flops["iteration_mean_over_bound"], flops["iteration_median_over_bound"],
                goal_verdict(flops["iteration_mean_over_bound"], BOUND_GOAL, at_most=True),
                flops["step_bound_ms"], flops["step_mean_over_bound"],
            ])
        if item.spec.kind != "adamw":  # AdamW is the 1.0 line of the plot
            plot_rows.append((workload.name, label, summary["step_mean_ratio"],
                              summary["iteration_mean_ratio"], iteration_bound))
    for status, labels in missing.items():
        timing.rows.append([workload.name, ", ".join(labels), *["—"] * 8, status])
    return records


def run(settings: Settings) -> FigureResult:
    plans = QUICK_PLANS if settings.quick else FULL_PLANS
    result = FigureResult(NAME, "Optimizer-step and whole-iteration time vs torch.optim.AdamW")
    timing, bound = _timing_table(), _bound_table()
    plot_rows: list[tuple[str, str, float, float, float | None]] = []
    for make, specs in TIMED:
        workload = make(settings.quick, settings.device)
        plan = plans[workload.name]
        progress(NAME, f"{workload.description}: ≥{plan.warmup} warm-up (to the second refresh) + "
                       f"{plan.rounds} rounds of {plan.round_steps} timed steps (f100: whole period)")
        runs = measure(workload, specs(), plan, settings)
        records = _report(workload, runs, plan, timing, bound, plot_rows)
        result.data[workload.name] = {"description": workload.description, "plan": plan.__dict__,
                                      "runs": records}
    result.tables += [timing, bound]
    result.plots.append(_plot(plot_rows, settings))
    return result


def _plot(rows: list[tuple[str, str, float, float, float | None]], settings: Settings) -> str:
    workloads = list(dict.fromkeys(r[0] for r in rows))
    fig, axes = report.subplots(1, len(workloads), width=7.5 * len(workloads), height=5.0)
    for ax, name in zip(axes, workloads, strict=True):
        mine = [r for r in rows if r[0] == name]
        x = range(len(mine))
        ax.bar([i - 0.2 for i in x], [r[2] for r in mine], width=0.4, label="optimizer step")
        ax.bar([i + 0.2 for i in x], [r[3] for r in mine], width=0.4, label="whole iteration")
        bounds = [(i + 0.2, r[4]) for i, r in zip(x, mine, strict=True) if r[4] is not None]
        if bounds:
            ax.scatter(*zip(*bounds, strict=True), marker="_", s=400, color="black",
                       label="iteration bound (flops)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(list(x), [r[1] for r in mine], rotation=35, ha="right", fontsize=7)
        ax.set_yscale("log")  # ratios near 1 and in the tens side by side
        ax.set_ylim(top=4 * max(max(r[2], r[3]) for r in mine))  # headroom for the legend
        ax.set_ylabel("time / AdamW time (mean per step)")
        ax.set_title(name)
        ax.legend(fontsize=8, ncols=3, loc="upper left")
    return report.save(fig, settings.out_dir, f"{NAME}.png")
