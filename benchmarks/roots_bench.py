"""Figure 5: inverse p-th roots, fp64 eigh vs fp32 eigh (checked, fp64 fallback) vs coupled Newton.

Four measurements:

1. **Accuracy vs condition number.** Test matrices are built from their eigendecomposition,
   ``A = Q diag(λ) Qᵀ`` with a random orthogonal ``Q`` and ``λ`` geometric from 1 down to 1/κ, so the fp64
   reference root ``Q diag((λ + ε)^(−1/p)) Qᵀ`` is known without calling any solver. The input is fp64;
   ``ε`` is a tiny absolute ridge so the condition number κ is what the methods face (fp32 eigh cannot
   resolve eigenvalues below ~u₃₂·λ_max ≈ 6e-8, so its error grows like κ·u₃₂ there).
   Error = ‖X − X_ref‖_F / ‖X_ref‖_F.
2. **Speed, batched, side by side**: fp32 factors (as the optimizer stores them), the optimizer's relative
   ε = 1e-6, sizes 128–1024; the methods interleaved in every round, ratios per round, medians.
3. **Accuracy in the optimizer's setting**: statistics accumulated as ``S ← β₂S + (1−β₂)GGᵀ`` once in fp64
   (the reference) and once in fp32 (what the optimizer stores); each method roots the fp32 statistics,
   and its error against the exact root of the fp64 statistics is set beside the error the fp32
   statistics cause by themselves (the fp64 eigh root of them).
4. **Eigenbasis refreshes** (eigenvalue-corrected Shampoo): seconds per matrix of a full decomposition, a
   warm step from a slightly drifted basis and a kept basis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from lightning_shampoo import RootResult, inverse_pth_root
from lightning_shampoo.eigen import checked_eigh, eigenbasis, symmetrized

from . import report
from .harness import FigureResult, Settings, Table, median, progress, time_median, timed

NAME = "inverse_root"
METHODS: dict[str, dict[str, Any]] = {
    "eigh fp64": {"method": "eigh"},
    "eigh fp32": {"method": "eigh", "eigh_dtype": torch.float32},
    "newton": {"method": "newton"},
}
BASELINE = "eigh fp32"  # the speed ratios' denominator
EXPONENT = 4  # a 2-D block's root, −1/(2k) with k = 2
RIDGE = 1e-12  # absolute, on matrices with λ_max = 1
TIME_CONDITION = 1e6  # the condition number of the time-vs-size plot and the batched-vs-loop table
RELATIVE_EPSILON = 1e-6  # the optimizer's default ridge: speed and in-context accuracy
CONTEXT_CONDITIONS = (1e4, 1e8)  # of the gradient covariance behind the accumulated statistics
CONTEXT_BETA2 = 0.999
CONTEXT_COLUMNS = 32  # columns of each step's gradient block G
BASIS_DRIFT = 0.03  # rotation angle between the refreshes of the warm eigenbasis timing (c₀ ≈ 0.04)


@dataclass(frozen=True)
class Plan:
    """What to measure: see the module docstring."""

    conditions: dict[int, tuple[float, ...]]  # accuracy: size → condition numbers
    loop_sizes: tuple[int, ...]
    loop_batch: int
    repeats: int  # timings per measurement (median) up to size 512; one call above
    speed_batches: dict[int, int]  # size → batch of the side-by-side speed table
    speed_rounds: int
    context_sizes: tuple[int, ...]
    context_steps: int


ALL_CONDITIONS = (1e2, 1e4, 1e6, 1e8, 1e10)
FULL = Plan(
    # Newton takes seconds a matrix at 1024 and tens of seconds at 2048 on 2 cores: fewer conditions there.
    conditions={128: ALL_CONDITIONS, 256: ALL_CONDITIONS, 512: ALL_CONDITIONS, 1024: (1e2, 1e6, 1e10),
                2048: (TIME_CONDITION,)},
    loop_sizes=(128, 256, 512),
    loop_batch=4,
    repeats=3,
    speed_batches={128: 16, 256: 8, 512: 4, 1024: 2},
    speed_rounds=5,
    context_sizes=(128, 256),
    context_steps=1000,
)
QUICK = Plan(conditions={128: (1e2, 1e6, 1e10), 256: (TIME_CONDITION,)}, loop_sizes=(128,), loop_batch=2,
             repeats=1, speed_batches={128: 2}, speed_rounds=1, context_sizes=(48,), context_steps=100)


def spd_with_condition(size: int, condition: float, generator: torch.Generator,
                       batch: int = 1) -> tuple[Tensor, Tensor]:
    """``batch`` fp64 SPD matrices, eigenvalues geometric in ``[1/condition, 1]``, and their exact roots."""
    q, _ = torch.linalg.qr(torch.randn(batch, size, size, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0.0, -math.log10(condition), size, dtype=torch.float64)
    matrices = (q * eigenvalues) @ q.mT
    roots = (q * (eigenvalues + RIDGE).pow(-1.0 / EXPONENT)) @ q.mT
    return matrices, roots


def _solve(matrices: Tensor, method: str) -> RootResult:
    return inverse_pth_root(matrices, EXPONENT, epsilon=RIDGE, relative_epsilon=False, **METHODS[method])


def _solve_each(matrices: Tensor, method: str) -> list[RootResult]:
    """The Python loop a batched call replaces: one call per matrix."""
    return [_solve(matrix[None], method) for matrix in matrices]


def _solve_relative(matrices: Tensor, method: str) -> RootResult:
    """The optimizer's call: ε relative to λ_max."""
    return inverse_pth_root(matrices, EXPONENT, epsilon=RELATIVE_EPSILON, relative_epsilon=True,
                            **METHODS[method])


def relative_error(root: Tensor, reference: Tensor) -> Tensor:
    """‖X − X_ref‖_F / ‖X_ref‖_F per matrix."""
    return torch.linalg.matrix_norm(root.double() - reference) / torch.linalg.matrix_norm(reference)


def spectral_error(root: Tensor, reference: Tensor) -> Tensor:
    """‖X − X_ref‖₂ / ‖X_ref‖₂ per matrix: the error in the directions of the smallest eigenvalues."""
    difference = torch.linalg.matrix_norm(root.double() - reference, ord=2)
    return difference / torch.linalg.matrix_norm(reference, ord=2)


def run(settings: Settings) -> FigureResult:
    plan = QUICK if settings.quick else FULL
    generator = torch.Generator().manual_seed(settings.seed)
    result = FigureResult(NAME, "Inverse p-th root: accuracy and time, fp64 and fp32 eigh vs coupled Newton")
    accuracy, records = _accuracy(plan, generator, settings)
    speed, speed_records = _speed(plan, generator, settings)
    context, context_records = _context(plan, generator)
    bases, basis_records = _eigenbasis_paths(plan, generator, settings)
    loops = _batched_vs_loop(plan, generator, settings)
    result.tables += [accuracy, speed, context, bases, loops]
    result.data = {"exponent": EXPONENT, "ridge": RIDGE, "accuracy": records, "speed": speed_records,
                   "context": context_records, "eigenbasis": basis_records,
                   "batched_vs_loop": [dict(zip(loops.columns, row, strict=True)) for row in loops.rows]}
    result.plots.append(_plot(records, speed_records, settings))
    return result


def _accuracy(plan: Plan, generator: torch.Generator, settings: Settings) -> tuple[Table, list[dict]]:
    table = Table(
        f"(A + εI)^(-1/{EXPONENT}) of one fp64 matrix, ε = {RIDGE:g} (λ_max = 1): error vs the exact root, "
        "self-reported residual, acceptance (residual ≤ 0.1) and time",
        ["size", "condition", "method", "relative error", "residual", "accepted", "time s"],
    )
    records = []
    for size, conditions in plan.conditions.items():
        repeats = plan.repeats if size <= 512 else 1
        for condition in conditions:
            matrices, reference = spd_with_condition(size, condition, generator)
            matrices, reference = matrices.to(settings.device), reference.to(settings.device)
            for method in METHODS:
                call = partial(_solve, matrices, method)
                seconds, root_result = time_median(call, settings.device, repeats)
                record = {
                    "size": size, "condition": condition, "method": method,
                    "relative_error": float(relative_error(root_result.root, reference)[0]),
                    "residual": float(root_result.residual[0]),
                    "accepted": bool(root_result.accepted[0]),
                    "time_s": seconds,
                }
                records.append(record)
                table.rows.append([size, f"{condition:.0e}", method, record["relative_error"],
                                   record["residual"], record["accepted"], record["time_s"]])
                progress(NAME, f"size {size} κ {condition:.0e} {method}: "
                               f"error {record['relative_error']:.2e}, residual {record['residual']:.2e}, "
                               f"{seconds:.3f} s")
    table.notes.append(
        "residual: eigh's backward error + loss of orthogonality (+ clamped negative eigenvalues) of its "
        "decomposition, Newton's max|H^p·A − I| at the returned iterate (the optimizer rejects a root "
        f"above 0.1). Time: median of {plan.repeats} call(s) up to size 512, one call above. fp32 eigh "
        "is accurate to ~30·u₃₂/(p·ε_eff) with ε_eff = (λ_min + ε)/λ_max: at this tiny ridge it resolves "
        "κ up to ~1e5; the optimizer's relative ε = 1e-6 keeps ε_eff ≥ 1e-6 (see the in-context table)."
    )
    return table, records


def _speed(plan: Plan, generator: torch.Generator, settings: Settings) -> tuple[Table, list[dict]]:
    table = Table(
        f"Batched roots of fp32 factors (κ = {TIME_CONDITION:.0e}, relative ε = {RELATIVE_EPSILON:g}, "
        f"p = {EXPONENT}), methods interleaved: seconds per matrix and time over fp32 eigh's",
        ["size", "batch", "method", "s/matrix", f"× {BASELINE}", "fp32 fallbacks"],
    )
    records = []
    for size, batch in plan.speed_batches.items():
        matrices, _ = spd_with_condition(size, TIME_CONDITION, generator, batch=batch)
        matrices = matrices.float().to(settings.device)
        for method in METHODS:  # warm-up: first-call allocations and thread start-up
            _solve_relative(matrices, method)
        seconds: dict[str, list[float]] = {method: [] for method in METHODS}
        for _ in range(plan.speed_rounds):
            for method in METHODS:
                seconds[method].append(timed(partial(_solve_relative, matrices, method), settings.device)[0])
        # How many fp32 decompositions failed their check (and were redone in fp64): the same call's.
        fallbacks = int(checked_eigh(symmetrized(matrices, torch.float32)[0]).fallback.sum())
        for method in METHODS:
            ratios = [mine / base for mine, base in zip(seconds[method], seconds[BASELINE], strict=True)]
            record = {"size": size, "batch": batch, "method": method,
                      "s_per_matrix": median(seconds[method]) / batch, "ratio": median(ratios),
                      "fallbacks": fallbacks if method == BASELINE else None}
            records.append(record)
            table.rows.append([size, batch, method, record["s_per_matrix"], record["ratio"],
                               "" if record["fallbacks"] is None else f"{fallbacks}/{batch}"])
            progress(NAME, f"speed size {size} {method}: {record['s_per_matrix']:.4f} s/matrix, "
                           f"{record['ratio']:.2f}× {BASELINE}")
    table.notes.append(
        f"Median over {plan.speed_rounds} interleaved round(s) of one batched call each; the ratio is the "
        "median of the per-round ratios. fp32 eigh includes its check (two matmuls) and any fallback."
    )
    return table, records


def accumulated_statistics(size: int, condition: float, steps: int,
                           generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``S ← β₂S + (1−β₂)GGᵀ`` over ``steps`` gradient blocks ``G``, in fp64 and in fp32 side by side.

    ``G = M Z`` with a fixed ``M`` whose covariance ``MMᵀ`` has eigenvalues geometric in
    ``[1/condition, 1]``, ``Z`` Gaussian (``CONTEXT_COLUMNS`` columns); the fp32 run rounds each ``G``.
    """
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    mixing = q * torch.logspace(0.0, -math.log10(condition), size, dtype=torch.float64).sqrt()
    exact = torch.zeros(size, size, dtype=torch.float64)
    stored = torch.zeros(size, size)
    for _ in range(steps):
        gradient = mixing @ torch.randn(size, CONTEXT_COLUMNS, generator=generator, dtype=torch.float64)
        exact.mul_(CONTEXT_BETA2).addmm_(gradient, gradient.mT, alpha=1 - CONTEXT_BETA2)
        low = gradient.float()
        stored.mul_(CONTEXT_BETA2).addmm_(low, low.mT, alpha=1 - CONTEXT_BETA2)
    return exact, stored


def exact_root(matrix: Tensor) -> Tensor:
    """``(S + ε·λ_max·I)^(−1/p)`` of an fp64 matrix from its fp64 eigendecomposition."""
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    eigenvalues = eigenvalues.clamp_min(0.0)
    shifted = eigenvalues + RELATIVE_EPSILON * eigenvalues.amax()
    return (vectors * shifted.pow(-1.0 / EXPONENT)) @ vectors.mT


def _context(plan: Plan, generator: torch.Generator) -> tuple[Table, list[dict]]:
    table = Table(
        f"In the optimizer's setting: roots of fp32 statistics (β₂ = {CONTEXT_BETA2}, {plan.context_steps} "
        f"steps, relative ε = {RELATIVE_EPSILON:g}, p = {EXPONENT}) vs the exact root of the same "
        "statistics accumulated in fp64",
        ["size", "condition", "method", "spectral error", "Frobenius error", "× fp32 statistics' own"],
    )
    records = []
    for size in plan.context_sizes:
        for condition in CONTEXT_CONDITIONS:
            exact, stored = accumulated_statistics(size, condition, plan.context_steps, generator)
            reference = exact_root(exact)[None]
            errors = {}
            for method in METHODS:
                root = _solve_relative(stored[None], method).root
                errors[method] = (float(spectral_error(root, reference)[0]),
                                  float(relative_error(root, reference)[0]))
            own = errors["eigh fp64"][0]  # the fp32 statistics' own error: an exact root of them
            for method, (spectral, frobenius) in errors.items():
                record = {"size": size, "condition": condition, "method": method, "spectral_error": spectral,
                          "frobenius_error": frobenius, "over_storage": spectral / own}
                records.append(record)
                table.rows.append([size, f"{condition:.0e}", method, spectral, frobenius,
                                   record["over_storage"]])
            progress(NAME, f"context size {size} κ {condition:.0e}: " + ", ".join(
                f"{method} {spectral:.1e}" for method, (spectral, _) in errors.items()))
    table.notes.append(
        "fp64 eigh's error here is the fp32 statistics' own (rounding accumulated over the steps): no root "
        "of them can do better. The last column sets each method's spectral error beside it."
    )
    return table, records


def _eigenbasis_paths(plan: Plan, generator: torch.Generator,
                      settings: Settings) -> tuple[Table, list[dict]]:
    table = Table(
        "Eigenbasis refresh of fp32 factors (eigenvalue-corrected Shampoo), one batched call per path: "
        "seconds per matrix",
        ["size", "batch", "path", "s/matrix", "× full", "matrices on that path"],
    )
    records = []
    for size, batch in plan.speed_batches.items():
        q, _ = torch.linalg.qr(torch.randn(batch, size, size, generator=generator, dtype=torch.float64))
        eigenvalues = torch.logspace(0.0, -math.log10(TIME_CONDITION), size, dtype=torch.float64)
        skew = torch.randn(size, size, generator=generator, dtype=torch.float64)
        turn = torch.linalg.matrix_exp(BASIS_DRIFT * (skew - skew.mT) / math.sqrt(2 * size))
        before = ((q * eigenvalues) @ q.mT).float().to(settings.device)
        turned = turn @ q
        after = ((turned * eigenvalues) @ turned.mT).float().to(settings.device)
        basis = eigenbasis(before).basis
        calls = {"full": partial(eigenbasis, after), "warm": partial(eigenbasis, after, basis),
                 "kept": partial(eigenbasis, before, basis)}
        timings = {path: time_median(call, settings.device, plan.speed_rounds)
                   for path, call in calls.items()}
        for path, (time_s, outcome) in timings.items():
            taken = {"full": outcome.full, "warm": ~outcome.full & ~outcome.kept, "kept": outcome.kept}
            record = {"size": size, "batch": batch, "path": path, "s_per_matrix": time_s / batch,
                      "ratio": time_s / timings["full"][0], "on_path": int(taken[path].sum())}
            records.append(record)
            table.rows.append([size, batch, path, record["s_per_matrix"], record["ratio"],
                               f"{record['on_path']}/{batch}"])
        progress(NAME, f"eigenbasis size {size}: " + ", ".join(
            f"{r['path']} {r['s_per_matrix']:.4f} s" for r in records[-3:]))
    table.notes.append(
        f"full: checked fp32 eigh; warm: one power-iteration + QR step from the basis of the factor before a "
        f"rotation by {BASIS_DRIFT} (off-diagonal mass c₀ ≈ 0.04, between tolerance 0.01 and restart 0.1); "
        f"kept: the basis of an unchanged factor (c₀ ≤ 0.01: two matmuls). Median of {plan.speed_rounds}."
    )
    return table, records


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


def _plot(records: list[dict], speed: list[dict], settings: Settings) -> str:
    fig, (err_ax, time_ax) = report.subplots(1, 2, width=12.0, height=4.5)
    sizes = sorted({r["size"] for r in records})
    for method, style in zip(METHODS, ("-", ":", "--"), strict=True):
        for size in sizes:
            mine = [r for r in records if r["method"] == method and r["size"] == size]
            errors = [r["relative_error"] for r in mine]
            err_ax.plot([r["condition"] for r in mine], errors, style, marker="o", label=f"{method} {size}")
        mine = [r for r in speed if r["method"] == method]
        time_ax.plot([r["size"] for r in mine], [r["s_per_matrix"] for r in mine], style, marker="o",
                     label=method)
    err_ax.set(xscale="log", yscale="log", xlabel="condition number κ", ylabel="relative error vs exact root",
               title=f"accuracy of (A + εI)^(-1/{EXPONENT}), ε = {RIDGE:g}")
    err_ax.legend(fontsize=6, ncol=3)
    speed_sizes = sorted({r["size"] for r in speed})
    time_ax.set_xscale("log", base=2)
    time_ax.set(yscale="log", xlabel="matrix size", ylabel="seconds per matrix (batched)",
                title=f"fp32 factors, relative ε = {RELATIVE_EPSILON:g}", xticks=speed_sizes,
                xticklabels=[str(s) for s in speed_sizes])
    time_ax.legend()
    return report.save(fig, settings.out_dir, f"{NAME}.png")
