"""Ablation: steps and wall-clock to each convergence task's target for named Shampoo configurations.

A configuration is a name and Shampoo keyword options applied on top of the task's own Shampoo settings
(:data:`CONFIGURATIONS`: a new option is one more line). Every configuration, and AdamW as the baseline,
trains with Figure 2's machinery (:func:`benchmarks.convergence.measure`: same tasks, targets, seeds,
schedule and timing) over the task's shorter learning-rate sweep ``short_lrs`` (the best lr of Figure
2's sweep and a neighbour), and the best point of each sweep is compared with AdamW's. An option the
installed Shampoo does not take (not in ``inspect.signature(Shampoo)``, or refused by its constructor)
is recorded as unavailable instead of run; a configuration whose training raises is recorded as failed.
"""

from __future__ import annotations

import inspect
import math
import textwrap
from typing import Any

import torch

from lightning_shampoo import Shampoo

from . import convergence, optimizers, report
from .convergence import ConvergenceTask
from .harness import FigureResult, Settings, Table, progress

NAME = "ablation"

# Eigenvalue-corrected Shampoo at its best settings of the prototype sweeps (no graft, Adam β2 0.95).
_SOAP: dict[str, Any] = {
    "preconditioner": "eigenvalue_corrected", "graft": "none", "graft_beta2": 0.95,
    "start_preconditioning_step": 1,
}  # fmt: skip

# name → Shampoo keyword options on top of the defaults (issue 11's list: the defaults, classic Shampoo, each
# option, eigenvalue correction). Each line costs about one Shampoo sweep of Figure 2 with ``short_lrs``
# (about 1.5 minutes on two idle cores, most of it the char_lm_8k task).
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "defaults: root inverse, −1/2 per factor of a matrix, β2 0.95, factor ratio 16": {},
    "classic: −1/(2k) (−1/4 for a matrix), β2 0.999, every dim a factor": {
        "exponent_multiplier": 1.0, "betas": (0.9, 0.999), "max_factor_ratio": None,
    },
    "defaults, every dim a factor (vectors too)": {"max_factor_ratio": None},
    "defaults with the pseudo-inverse instead of the ridge": {"pseudo_inverse": True},
    "defaults with a ridge of 1e-4·λmax (default 1e-6)": {"epsilon": 1e-4},
    "defaults with a ridge of 1e-3·λmax": {"epsilon": 1e-3},
    "defaults with compact storage: bfloat16 roots, float32 factor triangles": {
        "factor_dtype": torch.bfloat16,
    },
    "compact storage with a ridge of 1e-4·λmax": {"factor_dtype": torch.bfloat16, "epsilon": 1e-4},
    "eigenvalue-corrected (SOAP: Adam β2 0.95, no graft, from step 1)": _SOAP,
    "eigenvalue-corrected with bfloat16 factors and bases": {**_SOAP, "factor_dtype": torch.bfloat16},
}  # fmt: skip


def unavailable(options: dict[str, Any]) -> str:
    """Why the installed Shampoo cannot take ``options`` ("" when it can)."""
    unknown = sorted(set(options) - set(inspect.signature(Shampoo).parameters))
    if unknown:
        return f"unavailable: Shampoo has no option {', '.join(unknown)}"
    try:
        optimizers.close(Shampoo(torch.nn.Linear(2, 2).parameters(), **options))
    except Exception as exc:  # a refused value is an unavailable configuration, not a failed benchmark
        return f"unavailable: {type(exc).__name__}: {exc}"
    return ""


def sweep(task: ConvergenceTask, family: str, options: dict[str, Any], device: torch.device,
          label: str) -> dict[str, Any]:
    """``family`` with ``options`` over ``task.short_lrs[family]``: every point and the best."""
    points = [convergence.measure(task, task.spec(family, lr, **options), device, label, figure=NAME)[0]
              for lr in task.short_lrs[family]]
    return {"options": options, "sweep": points, "best": convergence.best_of(points)}


def ablate(task: ConvergenceTask, configurations: dict[str, dict[str, Any]],
           device: torch.device) -> dict[str, dict[str, Any]]:
    """AdamW's short sweep, then each configuration's (or why it did not run), keyed by name."""
    entries = {"AdamW": sweep(task, "AdamW", {}, device, "AdamW")}
    for name, options in configurations.items():
        reason = unavailable(options)
        if not reason:
            try:
                entries[name] = sweep(task, "Shampoo", options, device, name)
                continue
            except Exception as exc:  # one broken option must not cost the other configurations
                reason = f"failed: {type(exc).__name__}: {exc}"
        progress(NAME, f"{task.name} | {name}: {reason}")
        entries[name] = {"options": options, "unavailable": reason}
    return entries


COLUMNS = ["task", "configuration", "best lr", "steps to target", "seconds to target", "steps AdamW/this",
           "wall-clock AdamW/this", "status"]


def rows(task: str, entries: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """One table row per entry of :func:`ablate` (AdamW first, its ratios 1)."""
    adamw = entries["AdamW"]["best"]
    out = []
    for name, entry in entries.items():
        if "unavailable" in entry:
            out.append([task, name, None, None, None, None, None, entry["unavailable"]])
            continue
        best = entry["best"]
        out.append([task, name, best["lr"], best["steps_to_target"], best["seconds_to_target"],
                    convergence.ratio(adamw, best, "steps_to_target"),
                    convergence.ratio(adamw, best, "seconds_to_target"), _status(entry)])
    return out


def _status(entry: dict[str, Any]) -> str:
    lrs = [point["lr"] for point in entry["sweep"]]
    best = entry["best"]
    if not math.isfinite(best["steps_to_target"]):
        return "target not reached"
    if convergence.at_sweep_end(best["lr"], lrs):
        return f"best at an end of {lrs}"
    return ""


def run(settings: Settings) -> FigureResult:
    result = FigureResult(NAME, "Ablation: Shampoo configurations, steps and wall-clock to target vs AdamW")
    table = Table("Best of each configuration's short learning-rate sweep", COLUMNS, notes=[
        "Ratios are AdamW's best over the configuration's (above 1: the configuration needs less). Tasks, "
        "targets, seeds, schedule and timing as in the convergence figure; each configuration is Shampoo "
        "with the task's settings plus its options.",
    ])
    sweeps = Table("Every point of the short sweeps", ["task", "configuration", "lr", "steps to target",
                                                        "seconds to target", "final train loss"])
    for make in convergence.TASKS:
        task = make(settings.quick, settings.device)
        progress(NAME, f"{task.description}: target train loss {task.target:g}, ≤{task.max_steps} steps")
        entries = ablate(task, CONFIGURATIONS, settings.device)
        table.rows += rows(task.name, entries)
        sweeps.rows += [[task.name, name, point["lr"], point["steps_to_target"], point["seconds_to_target"],
                         point["final_train_loss"]]
                        for name, entry in entries.items() for point in entry.get("sweep", [])]
        result.data[task.name] = {"target": task.target, "short_lrs": task.short_lrs, "entries": entries}
    result.tables += [table, sweeps]
    result.plots.append(_plot(result.data, settings))
    return result


def _plot(data: dict[str, dict[str, Any]], settings: Settings) -> str:
    """Steps (top) and seconds (bottom) to each task's target, one bar per configuration, in the same rows
    for every task (named in the first column; "not reached" where a configuration never got there)."""
    fig, axes = report.subplots(2, len(data), width=5.0 + 3.5 * len(data), height=8.0)
    for column, (task, record) in enumerate(data.items()):
        names = list(record["entries"])
        best = [record["entries"][name].get("best") for name in names]
        reached = [b is not None and math.isfinite(b["steps_to_target"]) for b in best]
        for row, (key, label) in enumerate((("steps_to_target", "steps"), ("seconds_to_target", "seconds"))):
            ax = axes[row * len(data) + column]
            ax.barh(range(len(names)), [b[key] if ok else 0.0 for b, ok in zip(best, reached, strict=True)])
            for position, ok in enumerate(reached):
                if not ok:
                    ax.text(0, position, " not reached", va="center", fontsize=7)
            labels = ["\n".join(textwrap.wrap(name, 48)) for name in names] if column == 0 else []
            ax.set_yticks(range(len(names)), labels=labels, fontsize=7)
            ax.invert_yaxis()
            ax.set(xlabel=f"{label} to target {record['target']:g}", title=task)
    return report.save(fig, settings.out_dir, f"{NAME}.png")
