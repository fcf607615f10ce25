"""Figure 1: optimizer-step and whole-iteration time as ratios to AdamW, next to the flop-model bound.

Every configuration gets its own copy of the model (same seed, same batches) and all of them stay
alive for the whole measurement. After a warm-up (lazy state, and up to the install of the first roots,
which an asynchronous refresh delays by its lag), the configurations take
turns: each round runs ``steps_per_round`` timed iterations of one configuration, then the next, so
drift of the machine hits all of them alike. A round spans whole refresh periods, so its mean step time
carries its share of root refreshes; "mean" below is the median over rounds of those round means,
"median" the median over every timed step (a step without a refresh).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim import Optimizer

from . import optimizers, report
from .flops import forward_backward_flops, shampoo_step_flops
from .harness import FigureResult, Settings, Table, goal_verdict, mean, median, progress, synchronize
from .models import WORKLOADS, Batch, Workload
from .optimizers import OptimizerSpec

NAME = "step_time"
FREQUENCIES = (10, 100)
# Issue 2's target: on the MLP, Shampoo's step at frequency 100 within this multiple of AdamW's.
MLP_STEP_GOAL = 11.0
# Issue 6's goal: measured iteration ratio within this factor of the flop-model bound.
BOUND_GOAL = 1.15


@dataclass(frozen=True)
class Plan:
    """How long to time one workload: ``rounds`` × ``steps_per_round`` timed steps after ``warmup``."""

    warmup: int
    rounds: int
    steps_per_round: int


# 100 steps per round = one refresh period at frequency 100 (ten at frequency 10).
FULL_PLANS = {
    "mlp": Plan(warmup=10, rounds=3, steps_per_round=100),
    "lm": Plan(warmup=10, rounds=2, steps_per_round=100),
}
QUICK_PLANS = {
    "mlp": Plan(warmup=2, rounds=2, steps_per_round=3),
    "lm": Plan(warmup=2, rounds=2, steps_per_round=2),
}


@dataclass
class Run:
    """One configuration's live model, optimizer and timings (seconds per step)."""

    spec: OptimizerSpec
    warmup: int = 0
    model: nn.Module | None = None
    optimizer: Optimizer | None = None
    step_s: list[float] = field(default_factory=list)
    iteration_s: list[float] = field(default_factory=list)
    forward_backward_s: list[float] = field(default_factory=list)
    round_step_means: list[float] = field(default_factory=list)
    round_iteration_means: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.optimizer is not None and not self.error


def configurations() -> list[OptimizerSpec]:
    """AdamW, Shampoo at each frequency and refresh mode, and the peers at matched settings."""
    specs = [optimizers.adamw()]
    for frequency in FREQUENCIES:
        specs += [optimizers.shampoo(frequency, refresh=mode) for mode in optimizers.refresh_modes()]
    for frequency in FREQUENCIES:
        specs += optimizers.peers(frequency)
    return specs


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
    run.error = f"{type(exc).__name__}: {exc}"
    progress(NAME, f"{workload.name} | {run.spec.label}: failed ({run.error})")


def measure(workload: Workload, specs: list[OptimizerSpec], plan: Plan, settings: Settings) -> list[Run]:
    """Time every configuration on ``workload`` side by side (see the module docstring)."""
    batches = workload.batches(torch.Generator().manual_seed(settings.seed))
    runs = [Run(spec) for spec in specs]
    for run in runs:
        if run.spec.factory is None:
            progress(NAME, f"{workload.name} | {run.spec.label}: {run.spec.unavailable}")
            continue
        torch.manual_seed(settings.seed)
        run.model = workload.build()
        try:
            run.optimizer = run.spec.factory(run.model.parameters())
            run.warmup = max(plan.warmup, run.spec.steady_after)
            for i in range(run.warmup):
                _iteration(run, batches[i % len(batches)], workload, settings.device)
        except Exception as exc:  # a peer's failure is reported in its row, not fatal to the figure
            _fail(run, workload, exc)
    for round_index in range(plan.rounds):
        for run in runs:
            if not run.ok:
                continue
            steps, iterations = [], []
            try:
                for i in range(plan.steps_per_round):
                    fb, step = _iteration(run, batches[i % len(batches)], workload, settings.device)
                    run.forward_backward_s.append(fb)
                    steps.append(step)
                    iterations.append(fb + step)
            except Exception as exc:  # as in the warm-up
                _fail(run, workload, exc)
                continue
            run.step_s += steps
            run.iteration_s += iterations
            run.round_step_means.append(mean(steps))
            run.round_iteration_means.append(mean(iterations))
            progress(
                NAME,
                f"{workload.name} | {run.spec.label} | round {round_index + 1}/{plan.rounds}: "
                f"step mean {1e3 * mean(steps):.2f} ms, median {1e3 * median(steps):.2f} ms; "
                f"iteration mean {1e3 * mean(iterations):.2f} ms",
            )
    for run in runs:
        if run.optimizer is not None:
            optimizers.close(run.optimizer)
    return runs


def _times_ms(run: Run) -> dict[str, float]:
    return {
        "step_mean_ms": 1e3 * median(run.round_step_means),
        "step_median_ms": 1e3 * median(run.step_s),
        "iteration_mean_ms": 1e3 * median(run.round_iteration_means),
        "iteration_median_ms": 1e3 * median(run.iteration_s),
    }


def _summary(run: Run, baseline: Run) -> dict[str, float]:
    """Milliseconds per step of ``run`` and their ratios to ``baseline``'s (AdamW's)."""
    mine, base = _times_ms(run), _times_ms(baseline)
    ratios = {key.replace("_ms", "_ratio"): value / base[key] for key, value in mine.items()}
    return {**mine, "forward_backward_median_ms": 1e3 * median(run.forward_backward_s), **ratios}


def _bound(workload: Workload, spec: OptimizerSpec, model: nn.Module, summary: dict[str, float],
           baseline_fb_ms: float) -> dict[str, float]:
    """Flop-model bound for a Shampoo run: iteration ratio ``1 + F_opt/F_fb`` and step time ``F_opt/rate``.

    ``rate`` is the flop rate AdamW's forward+backward achieved, so the step bound assumes Shampoo's
    matmuls run as fast as the model's own.
    """
    params = list(model.parameters())
    blocking = ("block_size", "max_preconditioned_dim", "precondition_1d")
    options = {key: spec.options[key] for key in blocking if key in spec.options}
    opt_flops = shampoo_step_flops(params, **options)
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
        ["workload", "optimizer", "step mean", "step median", "step ×AdamW (mean)", "step ×AdamW (median)",
         "iteration mean", "iteration median", "iter ×AdamW (mean)", "iter ×AdamW (median)", "goal / status"],
        notes=[
            "mean: median over rounds of the per-round mean; every round spans whole refresh periods, so it "
            "includes the amortised root refreshes. median: median over all timed steps (a step without a "
            "refresh).",
            f"Goal (issue 2): on the MLP, Shampoo's step at frequency 100 ≤ {MLP_STEP_GOAL:g}× AdamW's, "
            "judged on the mean (refreshes included).",
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
    if workload.name != "mlp" or spec.kind != "shampoo" or spec.options["precondition_frequency"] != 100:
        return ""
    verdict = goal_verdict(summary["step_mean_ratio"], MLP_STEP_GOAL, at_most=True)
    return f"step ≤{MLP_STEP_GOAL:g}× AdamW: {verdict}"


def run(settings: Settings) -> FigureResult:
    plans = QUICK_PLANS if settings.quick else FULL_PLANS
    result = FigureResult(NAME, "Optimizer-step and whole-iteration time vs torch.optim.AdamW")
    timing, bound = _timing_table(), _bound_table()
    plot_rows: list[tuple[str, str, float, float, float | None]] = []
    for make in WORKLOADS:
        workload = make(settings.quick, settings.device)
        plan = plans[workload.name]
        progress(NAME, f"{workload.description}: ≥{plan.warmup} warm-up (to the first installed roots) + "
                       f"{plan.rounds}×{plan.steps_per_round} timed steps")
        runs = measure(workload, configurations(), plan, settings)
        baseline = runs[0]
        records: dict[str, dict[str, object]] = {}
        unavailable: dict[str, list[str]] = {}
        for item in runs:
            label = item.spec.label
            if not item.ok:
                reason = item.error or item.spec.unavailable
                records[label] = {"unavailable": reason}
                unavailable.setdefault(reason, []).append(label.rsplit(" f", 1)[0])
                continue
            summary = _summary(item, baseline)
            timing.rows.append([
                workload.name, label, summary["step_mean_ms"], summary["step_median_ms"],
                summary["step_mean_ratio"], summary["step_median_ratio"], summary["iteration_mean_ms"],
                summary["iteration_median_ms"], summary["iteration_mean_ratio"],
                summary["iteration_median_ratio"], _goal(workload, item.spec, summary),
            ])
            records[label] = {"options": item.spec.options, "warmup_steps": item.warmup, **summary}
            iteration_bound = None
            if item.spec.kind == "shampoo":
                assert item.model is not None
                flops = _bound(workload, item.spec, item.model, summary,
                               1e3 * median(baseline.forward_backward_s))
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
        for reason, names in unavailable.items():
            timing.rows.append([workload.name, ", ".join(dict.fromkeys(names)), *["—"] * 8, reason])
        result.data[workload.name] = {"description": workload.description, "plan": plan.__dict__,
                                      "runs": records}
    result.tables += [timing, bound]
    result.plots.append(_plot(plot_rows, settings))
    return result


def _plot(rows: list[tuple[str, str, float, float, float | None]], settings: Settings) -> str:
    workloads = list(dict.fromkeys(r[0] for r in rows))
    fig, axes = report.subplots(1, len(workloads), width=6.0 * len(workloads), height=4.0)
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
        ax.set_xticks(list(x), [r[1] for r in mine], rotation=20, ha="right")
        ax.set_ylabel("time / AdamW time (mean per step)")
        ax.set_title(name)
        ax.legend(fontsize=8)
    return report.save(fig, settings.out_dir, f"{NAME}.png")
