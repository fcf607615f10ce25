"""Figure 5: inverse p-th root accuracy and time, eigh vs coupled Newton, batched vs looped.

Test matrices are built from their eigendecomposition, ``A = Q diag(λ) Qᵀ`` with a random orthogonal
``Q`` and ``λ`` geometric from 1 down to 1/κ, so the fp64 reference root
``Q diag((λ + ε)^(−1/p)) Qᵀ`` is known without calling any solver. The input is fp64 (the optimizer's
refresh also computes in fp64); ``ε`` is a tiny absolute ridge so the condition number κ is what the
methods face. Error = ‖X − X_ref‖_F / ‖X_ref‖_F.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from lightning_shampoo import RootResult, inverse_pth_root

from . import report
from .harness import FigureResult, Settings, Table, progress, time_median

NAME = "inverse_root"
METHODS = ("eigh", "newton")
EXPONENT = 4  # a 2-D block's root, −1/(2k) with k = 2
RIDGE = 1e-12  # absolute, on matrices with λ_max = 1
TIME_CONDITION = 1e6  # the condition number of the time-vs-size plot and the batched-vs-loop table


@dataclass(frozen=True)
class Plan:
    """Matrix sizes with the condition numbers tried at each, and the batched-vs-loop comparison."""

    conditions: dict[int, tuple[float, ...]]
    loop_sizes: tuple[int, ...]
    loop_batch: int
    repeats: int  # timings per measurement (median) up to size 512; one call above


ALL_CONDITIONS = (1e2, 1e4, 1e6, 1e8, 1e10)
FULL = Plan(
    # Newton takes seconds a matrix at 1024 and tens of seconds at 2048 on 2 cores: fewer conditions there.
    conditions={128: ALL_CONDITIONS, 256: ALL_CONDITIONS, 512: ALL_CONDITIONS, 1024: (1e2, 1e6, 1e10),
                2048: (TIME_CONDITION,)},
    loop_sizes=(128, 256, 512),
    loop_batch=4,
    repeats=3,
)
QUICK = Plan(conditions={128: (1e2, 1e6, 1e10), 256: (TIME_CONDITION,)}, loop_sizes=(128,), loop_batch=2,
             repeats=1)


def spd_with_condition(size: int, condition: float, generator: torch.Generator,
                       batch: int = 1) -> tuple[Tensor, Tensor]:
    """``batch`` fp64 SPD matrices, eigenvalues geometric in ``[1/condition, 1]``, and their exact roots."""
    q, _ = torch.linalg.qr(torch.randn(batch, size, size, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0.0, -math.log10(condition), size, dtype=torch.float64)
    matrices = (q * eigenvalues) @ q.mT
    roots = (q * (eigenvalues + RIDGE).pow(-1.0 / EXPONENT)) @ q.mT
    return matrices, roots


def _solve(matrices: Tensor, method: str) -> RootResult:
    return inverse_pth_root(matrices, EXPONENT, epsilon=RIDGE, relative_epsilon=False, method=method)


def _solve_each(matrices: Tensor, method: str) -> list[RootResult]:
    """The Python loop a batched call replaces: one call per matrix."""
    return [_solve(matrix[None], method) for matrix in matrices]


def relative_error(root: Tensor, reference: Tensor) -> Tensor:
    """‖X − X_ref‖_F / ‖X_ref‖_F per matrix."""
    return torch.linalg.matrix_norm(root.double() - reference) / torch.linalg.matrix_norm(reference)


def run(settings: Settings) -> FigureResult:
    plan = QUICK if settings.quick else FULL
    generator = torch.Generator().manual_seed(settings.seed)
    device = settings.device
    result = FigureResult(NAME, "Inverse p-th root: accuracy and time, eigh vs coupled Newton")
    accuracy = Table(
        f"(A + εI)^(-1/{EXPONENT}) of one fp64 matrix, ε = {RIDGE:g} (λ_max = 1): error vs the exact root, "
        "self-reported residual, acceptance (residual ≤ 0.1) and time",
        ["size", "condition", "method", "relative error", "residual", "accepted", "time s"],
    )
    records = []
    for size, conditions in plan.conditions.items():
        repeats = plan.repeats if size <= 512 else 1
        for condition in conditions:
            matrices, reference = spd_with_condition(size, condition, generator)
            matrices, reference = matrices.to(device), reference.to(device)
            for method in METHODS:
                seconds, root_result = time_median(partial(_solve, matrices, method), device, repeats)
                record = {
                    "size": size, "condition": condition, "method": method,
                    "relative_error": float(relative_error(root_result.root, reference)[0]),
                    "residual": float(root_result.residual[0]),
                    "accepted": bool(root_result.accepted[0]),
                    "time_s": seconds,
                }
                records.append(record)
                accuracy.rows.append([size, f"{condition:.0e}", method, record["relative_error"],
                                      record["residual"], record["accepted"], record["time_s"]])
                progress(NAME, f"size {size} κ {condition:.0e} {method}: "
                               f"error {record['relative_error']:.2e}, residual {record['residual']:.2e}, "
                               f"{seconds:.3f} s")
    accuracy.notes.append(
        "residual: eigh's relative reconstruction error, Newton's max|H^p·A − I| at the returned iterate "
        f"(the optimizer rejects a root above 0.1). Time: median of {plan.repeats} call(s) up to size 512, "
        "one call above."
    )
    loops = _batched_vs_loop(plan, generator, settings)
    result.tables += [accuracy, loops]
    result.data = {"exponent": EXPONENT, "ridge": RIDGE, "accuracy": records,
                   "batched_vs_loop": [dict(zip(loops.columns, row, strict=True)) for row in loops.rows]}
    result.plots.append(_plot(records, settings))
    return result


def _batched_vs_loop(plan: Plan, generator: torch.Generator, settings: Settings) -> Table:
    table = Table(
        f"Batched call on {plan.loop_batch} matrices vs a Python loop of single calls "
        f"(κ = {TIME_CONDITION:.0e}), seconds per matrix",
        ["size", "method", "batched s/matrix", "loop s/matrix", "loop / batched"],
    )
    for size in plan.loop_sizes:
        matrices, _ = spd_with_condition(size, TIME_CONDITION, generator, batch=plan.loop_batch)
        matrices = matrices.to(settings.device)
        for method in METHODS:
            batched, _ = time_median(partial(_solve, matrices, method), settings.device, plan.repeats)
            looped, _ = time_median(partial(_solve_each, matrices, method), settings.device, plan.repeats)
            per = plan.loop_batch
            table.rows.append([size, method, batched / per, looped / per, looped / batched])
            progress(NAME, f"size {size} {method}: batched {batched / per:.4f} s/matrix, "
                           f"loop {looped / per:.4f} s/matrix")
    table.notes.append(f"Median of {plan.repeats} timing(s) each.")
    return table


def _plot(records: list[dict], settings: Settings) -> str:
    fig, (err_ax, time_ax) = report.subplots(1, 2, width=12.0, height=4.5)
    sizes = sorted({r["size"] for r in records})
    for method, style in zip(METHODS, ("-", "--"), strict=True):
        for size in sizes:
            mine = [r for r in records if r["method"] == method and r["size"] == size]
            errors = [r["relative_error"] for r in mine]
            err_ax.plot([r["condition"] for r in mine], errors, style, marker="o", label=f"{method} {size}")
        common = [r for r in records if r["method"] == method and r["condition"] == TIME_CONDITION]
        times = [r["time_s"] for r in common]
        time_ax.plot([r["size"] for r in common], times, style, marker="o", label=method)
    err_ax.set(xscale="log", yscale="log", xlabel="condition number κ", ylabel="relative error vs exact root",
               title=f"accuracy of (A + εI)^(-1/{EXPONENT})")
    err_ax.legend(fontsize=7, ncol=2)
    time_ax.set_xscale("log", base=2)
    time_ax.set(yscale="log", xlabel="matrix size", ylabel="seconds per matrix",
                title=f"time at κ = {TIME_CONDITION:.0e}", xticks=sizes, xticklabels=[str(s) for s in sizes])
    time_ax.legend()
    return report.save(fig, settings.out_dir, f"{NAME}.png")
