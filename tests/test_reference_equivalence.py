"""Shampoo against the independent plain-loop fp64 reference (tests/reference.py), step by step.

Gradients are seeded and independent of the weights, so a mismatch cannot be masked or amplified by
the trajectory: every step's update ΔW is compared on its own. Each gradient is a fixed mean plus
noise mixed along every dim by a fixed random matrix, so the Kronecker statistics are anisotropic and
correlated (a wrong factor, exponent or dim order changes the direction), and the mean keeps the
momentum from averaging out.

Tolerance: the optimizer keeps statistics and moments in fp32 and takes its roots (in fp64) of those
fp32 statistics. The dominant error is a factor's fp32 rounding, ~u·λmax (u ≈ 6e-8), seen through the
ridge ε·λmax: it moves the root's small eigenvalues by ~u/(p·ε) relatively, and right after a refresh
from rank-deficient statistics (a 6x1 block at step 2) new gradient directions live exactly there.
With ε = 1e-3 that bound is 3e-5 (measured ≤ 1.1e-5 over all cases here; ε = 1e-4 measured 6e-5, so
the tiny ε = 1e-6 only runs on statistics that are full rank at the first root). RTOL = 1e-4 of the
step's own size leaves ~10x headroom, while a wrong exponent, ridge, bias correction, merge rule,
schedule or weight decay in the reference fails these tests (checked by mutating it one at a time).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch

# pytest puts tests/ on sys.path (rootdir-relative "prepend" import mode).
from reference import ReferenceShampoo
from torch import Tensor, nn

from lightning_shampoo import Shampoo

RTOL = 1e-4

# Small, fast schedules: roots at steps 2, 5, 8, 11, 14 (several refreshes, graft-only step 1).
# block_size 8 keeps e.g. a 6x5 matrix two-dimensional (the default 1024 would merge it to 1-D).
# The classic blocking rules (every dim a factor, merging by block size alone) unless a case says otherwise.
BASE: dict[str, Any] = dict(
    max_factor_ratio=None,
    exponent_multiplier=1.0,
    lr=0.1,
    block_size=8,
    betas=(0.9, 0.95),
    epsilon=1e-3,
    start_preconditioning_step=2,
    precondition_frequency=3,
    graft_beta2=0.99,
)


class GradientStream:
    """Deterministic gradients ``G_t = μ + Z_t ×₁ C₁ ⋯ ×ₙ Cₙ`` per parameter, in fp32 precision."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        self.means = [0.5 * self._randn(shape) for shape in shapes]
        self.mixers = [
            [torch.eye(d, dtype=torch.float64) + self._randn((d, d)) / math.sqrt(d) for d in shape]
            for shape in shapes
        ]

    def _randn(self, shape: Sequence[int]) -> Tensor:
        return torch.randn(tuple(shape), generator=self.gen, dtype=torch.float64)

    def next(self) -> list[Tensor]:
        grads = []
        for shape, mean, mixers in zip(self.shapes, self.means, self.mixers, strict=True):
            g = self._randn(shape)
            for dim, mixer in enumerate(mixers):
                g = torch.movedim(torch.tensordot(mixer, g, dims=([1], [dim])), 0, dim)
            # Round once so both optimizers see bit-identical inputs.
            grads.append((mean + g).to(torch.float32))
        return grads


def _assert_update_close(actual: Tensor, expected: Tensor, where: str, rtol: float = RTOL) -> None:
    """``max|actual − expected| ≤ rtol · max|expected|`` (the step's own scale, elementwise)."""
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rtol * scale, f"{where}: max error {error:.3e} vs scale {scale:.3e}"


def _run_pair(
    shapes: Sequence[tuple[int, ...]],
    steps: int = 14,
    seed: int = 0,
    optimizer_only: dict[str, Any] | None = None,
    device: torch.device | None = None,
    rtol: float = RTOL,
    **overrides: Any,
) -> None:
    """Step Shampoo (its parameters on ``device``, CPU by default) and the fp64 reference side by side."""
    hp = {**BASE, **overrides}
    gen = torch.Generator().manual_seed(seed + 1)
    inits = [torch.randn(shape, generator=gen) for shape in shapes]
    params = [nn.Parameter(x.clone().to(device)) for x in inits]
    optimizer = Shampoo(params, **hp, **(optimizer_only or {}))
    reference = ReferenceShampoo(inits, **hp)
    stream = GradientStream(shapes, seed)
    for t in range(1, steps + 1):
        grads = stream.next()
        before = [p.detach().double().cpu() for p in params]
        reference_before = [w.clone() for w in reference.params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(p.device, copy=True)
        optimizer.step()
        reference.step(grads)
        for i, p in enumerate(params):
            actual = p.detach().double().cpu() - before[i]
            expected = reference.params[i] - reference_before[i]
            _assert_update_close(actual, expected, f"step {t}, param {i} {tuple(shapes[i])}", rtol)


CASES: dict[str, tuple[list[tuple[int, ...]], dict[str, Any]]] = {
    "2d": ([(6, 5)], {}),
    # Statistics already full rank at the first root (step 2), so the tiny ridge stays well conditioned.
    "2d_small_relative_epsilon": ([(6, 5)], dict(epsilon=1e-6, betas=(0.9, 0.999))),
    "3d_merged": ([(4, 6, 5)], dict(block_size=30)),
    "3d_unmerged": ([(4, 6, 5)], dict(block_size=6)),
    "3d_split_remainder_1": ([(4, 6, 5)], dict(block_size=4)),
    "1d": ([(10,)], dict(block_size=16)),
    "1d_blocked": ([(10,)], dict(block_size=4)),
    "0d": ([()], {}),
    "all_size_one": ([(1, 1)], {}),
    "blocked_uneven_edges": ([(10, 7)], dict(block_size=4)),
    "squeezed_and_merged": ([(3, 1, 4, 5)], dict(block_size=20)),
    "leading_one_to_1d": ([(1, 6)], {}),
    # Unsqueezed, the trailing 1 would survive merging (12·1 > 8) and make the block order 2.
    "trailing_one_after_large_dim": ([(12, 1)], {}),
    "default_block_size_merges_to_1d": ([(6, 5)], dict(block_size=1024)),
    "beta2_one": ([(10, 7), (4, 6, 5)], dict(block_size=4, betas=(0.9, 1.0))),
    "absolute_epsilon": ([(10, 7), (6, 5)], dict(block_size=4, relative_epsilon=False, epsilon=1e-2)),
    "exponent_override_2": ([(10, 7), (4, 6, 5)], dict(block_size=6, exponent_override=2)),
    "exponent_override_8": ([(6, 5)], dict(exponent_override=8)),
    "max_dim_skips_and_splits": ([(12, 10)], dict(block_size=4, max_preconditioned_dim=11)),
    "max_dim_skips_all": ([(12,), (12, 14)], dict(block_size=4, max_preconditioned_dim=11)),
    "max_dim_skips_merged": ([(20, 3, 3), (5, 6)], dict(block_size=9, max_preconditioned_dim=10)),
    # Order counts the block's dims, not its preconditioned ones: the 5-dim is still preconditioned.
    "skipped_dim_no_precondition_1d": ([(12, 5)], dict(max_preconditioned_dim=10, precondition_1d=False)),
    "no_precondition_1d": ([(10,), (4, 5), (6, 5)], dict(block_size=20, precondition_1d=False)),
    "statistics_frequency_2": ([(10, 7), (5,)], dict(block_size=4, statistics_frequency=2)),
    "large_graft_epsilon": ([(10, 7), (5,)], dict(block_size=4, graft_epsilon=0.3)),
    "weight_decay": ([(6, 5), (5,)], dict(weight_decay=0.1)),
    "late_start_long_gap": ([(6, 5)], dict(start_preconditioning_step=5, precondition_frequency=7)),
    "every_step_refresh": ([(6, 5), (4, 6, 5)], dict(start_preconditioning_step=1, precondition_frequency=1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case: str) -> None:
    shapes, overrides = CASES[case]
    _run_pair(shapes, **overrides)


@pytest.mark.parametrize("graft", ["adam", "adagrad", "rmsprop", "sgd", "none"])
def test_graft_matches_reference(graft: str) -> None:
    _run_pair([(10, 7), (5,), ()], steps=16, graft=graft, block_size=4)


@pytest.mark.parametrize("case", ["2d", "3d_unmerged", "blocked_uneven_edges", "exponent_override_8", "1d"])
def test_newton_roots_match_the_eigh_reference(case: str) -> None:
    shapes, overrides = CASES[case]
    _run_pair(shapes, optimizer_only={"inverse_root": "newton"}, **overrides)


def test_param_groups_with_different_lr() -> None:
    """Each group follows its own lr; the reference runs one instance per group."""
    shapes = [(6, 5), (7,)]
    gen = torch.Generator().manual_seed(3)
    inits = [torch.randn(s, generator=gen) for s in shapes]
    params = [nn.Parameter(x.clone()) for x in inits]
    hp = BASE
    optimizer = Shampoo([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.02}], **hp)
    references = [ReferenceShampoo([inits[0]], **hp), ReferenceShampoo([inits[1]], **{**hp, "lr": 0.02})]
    stream = GradientStream(shapes, seed=3)
    for t in range(1, 13):
        grads = stream.next()
        before = [p.detach().double().clone() for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        for i, (reference, g) in enumerate(zip(references, grads, strict=True)):
            reference_before = reference.params[0].clone()
            reference.step([g])
            actual = params[i].detach().double() - before[i]
            _assert_update_close(actual, reference.params[0] - reference_before, f"step {t}, group {i}")


def test_graft_only_matches_adamw_on_mlp() -> None:
    """Preconditioning never starting + Adam graft is AdamW (decoupled decay, bias corrections)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    twin = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    twin.load_state_dict(model.state_dict())
    lr, beta1, beta2, eps, wd = 1e-2, 0.9, 0.99, 1e-8, 0.05
    shampoo = Shampoo(
        model.parameters(),
        lr=lr,
        betas=(beta1, 0.999),
        weight_decay=wd,
        start_preconditioning_step=10_000,
        graft="adam",
        graft_beta2=beta2,
        graft_epsilon=eps,
    )
    adamw = torch.optim.AdamW(twin.parameters(), lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 5, generator=gen)
    y = torch.randn(32, 3, generator=gen)
    inits = [p.detach().clone() for p in twin.parameters()]
    for _ in range(20):
        for net, opt in ((model, shampoo), (twin, adamw)):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        for p, q, p0 in zip(model.parameters(), twin.parameters(), inits, strict=True):
            # Weights within 1e-6 of their size (measured 1e-7); and, as the weights hide a small
            # update, the displacement from the start within 1e-5 of its size (measured 3e-7).
            assert (p - q).norm() <= 1e-6 * q.norm()
            assert (p - q).norm() <= 1e-5 * (q - p0).norm()


# ------------------------------------------------------------------ root options and eigenvalue correction

ROOT_OPTION_CASES: dict[str, tuple[list[tuple[int, ...]], dict[str, Any]]] = {
    # No factor far larger than its block: vectors keep the graft, a 10×7 weight is not merged to 1-D, a
    # 20×3 block is preconditioned on its 3-side only, the 2-D remainder blocks follow the full-size ones.
    "factor_ratio_4": (
        [(10,), (10, 7), (20, 3), (12, 10), (4, 6, 5)],
        dict(block_size=8, max_factor_ratio=4.0),
    ),
    "factor_ratio_default_blocking": ([(10, 7), (40, 9), (7,)], dict(block_size=1024, max_factor_ratio=4.0)),
    "exponent_multiplier_2": ([(10, 7), (4, 6, 5)], dict(block_size=6, exponent_multiplier=2.0)),
    "exponent_one_third": ([(6, 5), (10,)], dict(exponent_multiplier=4 / 3, block_size=8)),
    # Rank-deficient statistics (a 6x5 block after one step has rank 1): the pseudo-inverse drops the null
    # space instead of lifting it by the ridge.
    "pseudo_inverse": ([(6, 5), (10, 7)], dict(block_size=8, pseudo_inverse=True)),
    "pseudo_inverse_every_step": (
        [(6, 5)],
        dict(pseudo_inverse=True, start_preconditioning_step=1, precondition_frequency=1),
    ),
}


@pytest.mark.parametrize("case", list(ROOT_OPTION_CASES))
def test_root_options_match_reference(case: str) -> None:
    shapes, overrides = ROOT_OPTION_CASES[case]
    _run_pair(shapes, **overrides)


# Compact storage (factor_dtype=bfloat16): the factors are float32 triangles, exact, and the bfloat16 roots
# are multiplied in float32, so every step's update is the reference's up to the rounding of the roots
# (2⁻⁹ of each entry): within 1% of the step's largest entry where the factors have full rank. (A rank-2
# factor of a vector, exponent −1 at a 1e-6 ridge, spans six orders of magnitude: up to 10% there.)
COMPACT = {"factor_dtype": torch.bfloat16}
COMPACT_RTOL = 1e-2


@pytest.mark.parametrize(
    "case", ["2d", "blocked_uneven_edges", "3d_merged", "beta2_one", "every_step_refresh", "absolute_epsilon"]
)
def test_compact_storage_matches_reference_to_bfloat16_precision(case: str) -> None:
    shapes, overrides = CASES[case]
    _run_pair(shapes, optimizer_only=COMPACT, rtol=COMPACT_RTOL, **overrides)


# An eigenbasis is unique only where the spectrum is simple: a rank-deficient factor's null space may be
# spanned by any basis, and the rotated second moment there depends on which. So the first refresh waits
# until every factor has full rank (rank-1 updates per step for 1-D blocks: step 8 covers dims up to 7).
CORRECTED = dict(preconditioner="eigenvalue_corrected", graft="none", start_preconditioning_step=8, steps=20)
# The reference decomposes every factor exactly at every refresh: so does the optimizer here (no warm start).
EXACT_BASES = {"basis_tolerance": 0.0}
CORRECTED_CASES: dict[str, tuple[list[tuple[int, ...]], dict[str, Any]]] = {
    "2d": ([(6, 5)], {}),
    "blocked_3d_1d_0d": ([(10, 7), (4, 6, 5), (10,), ()], dict(block_size=4)),
    "skipped_dims": ([(12, 10), (20, 3, 3)], dict(block_size=9, max_preconditioned_dim=10)),
    "no_precondition_1d": ([(10,), (6, 5)], dict(precondition_1d=False)),
    "every_step_refresh": ([(6, 5), (4, 6, 5)], dict(block_size=6, precondition_frequency=1)),
    "weight_decay_beta2_one": ([(6, 5), (5,)], dict(weight_decay=0.1, betas=(0.9, 1.0))),
    "statistics_frequency_2": (
        [(10, 7)],
        dict(block_size=4, statistics_frequency=2, start_preconditioning_step=9),
    ),
}


@pytest.mark.parametrize("case", list(CORRECTED_CASES))
def test_eigenvalue_corrected_matches_reference(case: str) -> None:
    shapes, overrides = CORRECTED_CASES[case]
    _run_pair(shapes, optimizer_only=EXACT_BASES, **{**CORRECTED, **overrides})


@pytest.mark.parametrize("graft", ["adam", "adagrad", "sgd"])
def test_eigenvalue_corrected_with_a_graft_matches_reference(graft: str) -> None:
    _run_pair(
        [(10, 7), (5,), ()], optimizer_only=EXACT_BASES, **{**CORRECTED, "graft": graft, "block_size": 4}
    )


def test_eigenvalue_corrected_without_refresh_is_adamw() -> None:
    """Before its first eigenbasis the eigenvalue-corrected preconditioner is Adam (Q = I): AdamW exactly,
    with β2 and ε of the diagonal method."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    twin = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    twin.load_state_dict(model.state_dict())
    lr, wd = 1e-2, 0.05
    shampoo = Shampoo(
        model.parameters(), lr=lr, weight_decay=wd, preconditioner="eigenvalue_corrected", graft="none",
        start_preconditioning_step=10_000, graft_beta2=0.99, graft_epsilon=1e-8,
    )  # fmt: skip
    adamw = torch.optim.AdamW(twin.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 5, generator=gen), torch.randn(32, 3, generator=gen)
    for _ in range(20):
        for net, opt in ((model, shampoo), (twin, adamw)):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert (p - q).norm() <= 1e-6 * q.norm()


def test_rejected_roots_never_switch_a_parameter_to_shampoo() -> None:
    """Every root rejected (an impossible residual bound): the update stays the graft's, step after step,
    as in a reference that never preconditions."""
    shapes = [(6, 5), (10,)]
    gen = torch.Generator().manual_seed(5)
    inits = [torch.randn(shape, generator=gen) for shape in shapes]
    params = [nn.Parameter(x.clone()) for x in inits]
    hp = {**BASE, "start_preconditioning_step": 1, "precondition_frequency": 1}
    optimizer = Shampoo(params, **hp, max_root_residual=1e-300)
    reference = ReferenceShampoo(inits, **{**hp, "start_preconditioning_step": 10_000})
    stream = GradientStream(shapes, seed=5)
    with pytest.warns(RuntimeWarning, match="every result of a refresh was rejected"):
        for _ in range(6):
            grads = stream.next()
            before = [p.detach().double().clone() for p in params]
            reference_before = [w.clone() for w in reference.params]
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
            reference.step(grads)
            for i, p in enumerate(params):
                _assert_update_close(
                    p.detach().double() - before[i], reference.params[i] - reference_before[i], ""
                )
    assert optimizer.metrics()["roots_accepted"] == 0
    assert optimizer.metrics()["rejected_refreshes"] == 6
    assert not any(optimizer.state[p]["preconditioned"] for p in params)
