"""Inverse p-th roots against an fp64 reference built from a known spectrum.

Test matrices are ``A = Q diag(s) Qᵀ`` with a random orthogonal ``Q`` and a chosen spectrum ``s``, so the
reference root ``Q diag((s + ε)^(−1/p)) Qᵀ`` needs no decomposition at all.

Tolerances. Building ``A`` in fp64 perturbs it by ``E`` with ``‖E‖₂ ≈ u·λ_max`` (u = 2⁻⁵³, times a
small constant), which moves the eigenvalues of ``A + εI`` by up to that much, i.e. by a relative
``κ·u`` at the bottom of the spectrum, ``κ = (s_max + ε)/(s_min + ε)``. To first order a relative
eigenvalue error δ changes ``λ^(−1/p)`` by ``δ/p``, so any method, exact or not, is off the reference
by up to ``~κ·u`` in relative norm; we allow ``10·κ·u`` (a few 1e-9 at the κ ≤ 1e6 that a relative
ridge of 1e-6 guarantees, 1e-4 at κ = 1e11). Newton additionally stops once its residual
``r = max|M − I| ≤ tol`` (1e-6), where ``M = H^p (A + εI)`` commutes with ``A``, so
``H = (A + εI)^(−1/p) M^(1/p)`` is off by ``‖M^(1/p) − I‖₂ ≈ ‖M − I‖₂/p ≤ d·r/p`` relative (a matrix's
spectral norm is at most d times its largest entry); it gets twice that on top, using the ``r`` it
reports, which also checks that the reported residual is honest.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_shampoo.roots import inverse_pth_root, max_eigenvalue

UNIT_ROUNDOFF = 2.0**-53
NEWTON_TOLERANCE = 1e-6
CONDITIONS = [1e0, 1e3, 1e6, 1e9, 1e12]
SIZES = [8, 16, 33, 64]


def _orthogonal(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]


def _spectrum(
    n: int, d: int, condition: float, gen: torch.Generator, rank: int | None = None
) -> torch.Tensor:
    """Geometric from a random scale in [1, 10) down to scale/condition; zeros past ``rank``."""
    scale = 10 ** torch.rand(n, 1, generator=gen, dtype=torch.float64)
    s = scale * torch.logspace(0, -math.log10(condition), d, dtype=torch.float64)
    if rank is not None:
        s[:, rank:] = 0.0
    return s


def _compose(q: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``Q diag(values) Qᵀ``, symmetrised so that it is exactly symmetric."""
    a = (q * values[:, None, :]) @ q.mT
    return 0.5 * (a + a.mT)


def _ridge(s: torch.Tensor, epsilon: float, relative: bool) -> torch.Tensor:
    return epsilon * s.amax(dim=-1, keepdim=True) if relative else torch.full_like(s[:, :1], epsilon)


def _relative_error(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(x - ref) / torch.linalg.matrix_norm(ref)


def _tolerance(kappa: torch.Tensor, result, p: int, method: str) -> torch.Tensor:
    base = 10 * kappa * UNIT_ROUNDOFF + 1e-12
    if method == "newton":
        return base + 2 * result.root.shape[-1] * result.residual / p
    return base


def _check_against_reference(s, q, p, epsilon, relative, method):
    a = _compose(q, s)
    ridge = _ridge(s, epsilon, relative)
    shifted = s + ridge
    reference = _compose(q, shifted.pow(-1.0 / p))
    kappa = shifted.amax(dim=-1) / shifted.amin(dim=-1)
    result = inverse_pth_root(a, p, epsilon=epsilon, relative_epsilon=relative, method=method)
    assert result.accepted.all()
    assert result.root.dtype == torch.float64 and result.residual.dtype == torch.float64
    error = _relative_error(result.root, reference)
    assert (error <= _tolerance(kappa, result, p, method)).all(), (error, kappa, result.residual)
    # eigh: a sound decomposition reconstructs to roundoff; newton: it ran to its tolerance.
    assert (result.residual <= (NEWTON_TOLERANCE if method == "newton" else 1e-12)).all()
    return result


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("relative, epsilon", [(True, 1e-6), (False, 1e-13)])
@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("p", [2, 4, 6, 8])
def test_root_matches_reference(p, condition, relative, epsilon, method):
    index = CONDITIONS.index(condition)
    gen = torch.Generator().manual_seed(1000 * p + index)
    d = SIZES[(index + p // 2) % len(SIZES)]  # every size meets every p and most condition numbers
    s = _spectrum(3, d, condition, gen)
    _check_against_reference(s, _orthogonal(3, d, gen), p, epsilon, relative, method)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_large_matrix_root_inverts(method):
    gen = torch.Generator().manual_seed(7)
    d, p = 256, 4
    s, q = _spectrum(1, d, 1e9, gen), _orthogonal(1, d, gen)
    result = _check_against_reference(s, q, p, 1e-6, True, method)
    # A check that does not use the spectrum: X^p (A + εI) ≈ I. Newton stops at max|M − I| ≤ 1e-6 and
    # roundoff adds ~κ_eff·u ≈ 1e-10 (κ_eff ≈ 1e6), so 1e-5 leaves a margin; eigh lands far below it.
    regularized = _compose(q, s + _ridge(s, 1e-6, True))
    product = torch.linalg.matrix_power(result.root, p) @ regularized
    assert (product - torch.eye(d, dtype=torch.float64)).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("relative, epsilon", [(True, 1e-6), (False, 1e-8)])
def test_singular_matrices_use_the_ridge(method, relative, epsilon):
    gen = torch.Generator().manual_seed(11)
    for d, rank in [(8, 1), (33, 10), (64, 63)]:
        s = _spectrum(2, d, 1e3, gen, rank=rank)
        _check_against_reference(s, _orthogonal(2, d, gen), 4, epsilon, relative, method)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_singular_matrix_without_ridge_is_rejected(method):
    gen = torch.Generator().manual_seed(12)
    s = _spectrum(2, 16, 1e2, gen, rank=8)
    a = _compose(_orthogonal(2, 16, gen), s)
    result = inverse_pth_root(a, 2, epsilon=0.0, relative_epsilon=False, method=method)
    assert not result.accepted.any()
    assert (result.residual > 0.1).all()


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_materially_indefinite_input_is_rejected(method):
    # eigh would clamp the negative eigenvalue away (the reconstruction check sees it); Newton diverges on it.
    gen = torch.Generator().manual_seed(14)
    s = torch.tensor([[1.0, 0.3, -0.5, 0.2, 0.1]], dtype=torch.float64)
    a = _compose(_orthogonal(1, 5, gen), s)
    result = inverse_pth_root(a, 2, epsilon=1e-6, relative_epsilon=True, method=method)
    assert not result.accepted.any() and (result.residual > 0.1).all()


def test_eigh_clamps_roundoff_negative_eigenvalues():
    # A PSD matrix whose smallest eigenvalues came out slightly negative (roundoff-sized, but larger
    # than the ridge): eigh treats them as 0, so the root is finite and equals the clamped reference.
    gen = torch.Generator().manual_seed(16)
    s = torch.tensor([[2.0, 1.0, 0.5, -1e-9, -1e-7]], dtype=torch.float64)
    q = _orthogonal(1, 5, gen)
    result = inverse_pth_root(_compose(q, s), 2, epsilon=1e-8, relative_epsilon=False)
    assert result.accepted.all()
    reference = _compose(q, (s.clamp_min(0) + 1e-8).pow(-0.5))
    kappa = torch.tensor(2.0 / 1e-8)
    assert _relative_error(result.root, reference) <= _tolerance(kappa, result, 2, "eigh")


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("p", [1, 2, 8])
def test_zero_matrix_absolute_epsilon_is_scaled_identity(method, p):
    epsilon, d = 1e-4, 5
    result = inverse_pth_root(
        torch.zeros(d, d, dtype=torch.float64), p, epsilon=epsilon, relative_epsilon=False, method=method
    )
    assert result.accepted.item()
    expected = epsilon ** (-1.0 / p) * torch.eye(d, dtype=torch.float64)
    assert _relative_error(result.root, expected) <= _tolerance(torch.tensor(1.0), result, p, method)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_zero_matrix_relative_epsilon_is_rejected(method):
    result = inverse_pth_root(torch.zeros(2, 4, 4), 4, epsilon=1e-6, relative_epsilon=True, method=method)
    assert not result.accepted.any()
    assert torch.isinf(result.residual).all()


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("relative", [True, False])
def test_batched_equals_per_matrix(method, relative):
    gen = torch.Generator().manual_seed(3)
    d = 12
    conditions = [1e0, 1e2, 1e4, 1e6, 1e8, 1e10]
    s = torch.cat([_spectrum(1, d, c, gen) for c in conditions])
    a = _compose(_orthogonal(len(conditions), d, gen), s).reshape(2, 3, d, d)
    kwargs = {"epsilon": 1e-6, "relative_epsilon": relative, "method": method}
    batched = inverse_pth_root(a, 4, **kwargs)
    assert batched.root.shape == a.shape and batched.residual.shape == batched.accepted.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            single = inverse_pth_root(a[i, j], 4, **kwargs)
            assert single.root.shape == (d, d) and single.residual.shape == ()
            torch.testing.assert_close(batched.root[i, j], single.root, rtol=1e-12, atol=0.0)
            torch.testing.assert_close(batched.residual[i, j], single.residual, rtol=1e-6, atol=1e-15)
            assert bool(batched.accepted[i, j]) == bool(single.accepted)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_non_finite_input_is_rejected_alone(method):
    gen = torch.Generator().manual_seed(4)
    d = 10
    a = _compose(_orthogonal(4, d, gen), _spectrum(4, d, 1e3, gen))
    poisoned = a.clone()
    poisoned[1, 2, 3] = math.nan
    poisoned[2, 0, 0] = math.inf
    kwargs = {"epsilon": 1e-6, "relative_epsilon": True, "method": method}
    result = inverse_pth_root(poisoned, 2, **kwargs)
    assert result.accepted.tolist() == [True, False, False, True]
    assert torch.isinf(result.residual[1:3]).all()
    assert torch.isnan(result.root[1:3]).all()
    clean = inverse_pth_root(a[[0, 3]], 2, **kwargs)
    torch.testing.assert_close(result.root[[0, 3]], clean.root, rtol=1e-12, atol=0.0)


def test_eigh_failure_falls_back_per_matrix(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    d = 6
    a = _compose(_orthogonal(3, d, gen), _spectrum(3, d, 1e2, gen))
    kwargs = {"epsilon": 1e-6, "relative_epsilon": True}
    clean = inverse_pth_root(a, 2, **kwargs)
    real_eigh = torch.linalg.eigh
    bad = a[1]

    def failing_eigh(x, *args, **kw):
        # Fails whenever the bad matrix is in the input, as LAPACK would on a non-convergent matrix.
        if (x == bad).all(dim=(-2, -1)).any():
            raise torch.linalg.LinAlgError("forced failure")
        return real_eigh(x, *args, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    result = inverse_pth_root(a, 2, **kwargs)
    assert result.accepted.tolist() == [True, False, True]
    assert torch.isinf(result.residual[1]) and torch.isnan(result.root[1]).all()
    torch.testing.assert_close(result.root[[0, 2]], clean.root[[0, 2]], rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_input_is_computed_in_float64(method, dtype):
    gen = torch.Generator().manual_seed(6)
    d = 16
    # Well conditioned: bf16 rounding of the entries (~1e-2 relative) must not make it indefinite.
    a = _compose(_orthogonal(2, d, gen), _spectrum(2, d, 1e1, gen)).to(dtype)
    kwargs = {"epsilon": 1e-6, "relative_epsilon": True, "method": method}
    result = inverse_pth_root(a, 4, **kwargs)
    assert result.root.dtype == dtype and result.residual.dtype == torch.float64
    assert result.accepted.all()
    # Same answer as the fp64 computation on the same values, rounded once at the end.
    assert torch.equal(result.root, inverse_pth_root(a.double(), 4, **kwargs).root.to(dtype))


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_asymmetric_roundoff_roots_the_symmetric_part(method):
    # Accumulated statistics are symmetric only up to roundoff; both methods must root (S + Sᵀ)/2.
    gen = torch.Generator().manual_seed(15)
    d = 12
    sym = _compose(_orthogonal(2, d, gen), _spectrum(2, d, 1e3, gen))
    noise = 1e-7 * torch.randn(2, d, d, generator=gen, dtype=torch.float64)
    kwargs = {"epsilon": 1e-6, "relative_epsilon": True, "method": method}
    skewed = inverse_pth_root(sym + (noise - noise.mT), 2, **kwargs)
    torch.testing.assert_close(skewed.root, inverse_pth_root(sym, 2, **kwargs).root, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_input_is_not_modified(method, relative, dtype):
    gen = torch.Generator().manual_seed(8)
    a = _compose(_orthogonal(3, 9, gen), _spectrum(3, 9, 1e4, gen)).to(dtype)
    a[0] += 1e-3 * torch.randn(9, 9, generator=gen, dtype=torch.float64).to(dtype)  # slightly asymmetric
    before = a.clone()
    inverse_pth_root(a, 2, epsilon=1e-3, relative_epsilon=relative, method=method)
    assert torch.equal(a, before)


def test_newton_residual_above_threshold_is_rejected():
    gen = torch.Generator().manual_seed(9)
    a = _compose(_orthogonal(2, 20, gen), _spectrum(2, 20, 1e6, gen))
    kwargs = {"epsilon": 1e-6, "relative_epsilon": True, "method": "newton", "newton_max_iterations": 1}
    truncated = inverse_pth_root(a, 4, **kwargs)
    assert (truncated.residual > 0.1).all() and not truncated.accepted.any()
    # The same finite roots pass a looser threshold: the rejection came from the residual alone.
    lenient = inverse_pth_root(a, 4, max_residual=math.inf, **kwargs)
    assert lenient.accepted.all()
    torch.testing.assert_close(lenient.residual, truncated.residual, rtol=0.0, atol=0.0)


def test_newton_stops_when_the_error_grows_and_keeps_the_previous_iterate():
    # A slightly indefinite matrix without ridge: the negative eigenvalue of M drifts away from 1, so
    # max|M − I| first falls, then grows. The run must stop at the smallest error seen and return the
    # root of that iterate: exactly what a run capped at that iteration returns.
    gen = torch.Generator().manual_seed(17)
    s = torch.tensor([[1.0, 0.5, 0.3, 0.2, 0.1, -1e-4]], dtype=torch.float64)
    a = _compose(_orthogonal(1, 6, gen), s)
    kwargs = {"epsilon": 0.0, "relative_epsilon": False, "method": "newton"}
    capped = [inverse_pth_root(a, 2, newton_max_iterations=k, **kwargs) for k in range(1, 16)]
    best = min(capped, key=lambda r: r.residual.item())
    assert best is not capped[-1] and best.residual < capped[0].residual  # it fell, then stopped
    full = inverse_pth_root(a, 2, **kwargs)
    assert full.residual == best.residual and not full.accepted.any()
    assert torch.equal(full.root, best.root)


def test_newton_residual_is_small_for_well_conditioned_input():
    gen = torch.Generator().manual_seed(10)
    a = _compose(_orthogonal(4, 32, gen), _spectrum(4, 32, 1e2, gen))
    result = inverse_pth_root(a, 2, epsilon=1e-6, relative_epsilon=True, method="newton")
    assert (result.residual <= NEWTON_TOLERANCE).all()
    # The residual is max|M − I| with M = H^p (A + εI); check that identity directly.
    ridge = 1e-6 * torch.linalg.eigvalsh(a).amax(dim=-1)
    regularized = a + ridge[:, None, None] * torch.eye(32, dtype=torch.float64)
    product = result.root @ result.root @ regularized
    assert ((product - torch.eye(32, dtype=torch.float64)).abs().amax(dim=(-2, -1)) <= 1e-5).all()


def test_max_eigenvalue_matches_eigvalsh():
    gen = torch.Generator().manual_seed(13)
    s = torch.cat([_spectrum(2, 24, c, gen) for c in (1e0, 1e3, 1e9)])
    a = _compose(_orthogonal(6, 24, gen), s)
    torch.testing.assert_close(max_eigenvalue(a), torch.linalg.eigvalsh(a).amax(dim=-1), rtol=1e-8, atol=0.0)
    assert max_eigenvalue(torch.zeros(3, 3, dtype=torch.float64)).item() == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p": 0}, "p must be a finite number > 0"),
        ({"p": -0.5}, "p must be a finite number > 0"),
        ({"p": math.inf}, "p must be a finite number > 0"),
        ({"p": 2.5, "method": "newton"}, "'newton' needs an integer p"),
        ({"pseudo_inverse": True, "method": "newton"}, "pseudo_inverse needs method='eigh'"),
        ({"eigh_dtype": torch.float16}, "eigh_dtype must be one of"),
        ({"method": "svd"}, "method must be one of"),
        ({"epsilon": -1e-6}, "epsilon must be finite and >= 0"),
        ({"epsilon": math.nan}, "epsilon must be finite and >= 0"),
        ({"matrices": torch.zeros(3, 4)}, "must be square"),
        ({"matrices": torch.zeros(4)}, "must be square"),
        ({"matrices": torch.zeros(3, 3, dtype=torch.int64)}, "floating dtype"),
        ({"max_residual": -1.0}, "max_residual must be >= 0"),
        ({"newton_tolerance": 0.0}, "newton_tolerance must be > 0"),
        ({"newton_max_iterations": 0}, "newton_max_iterations must be >= 1"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    args = {"matrices": torch.eye(3), "p": 2, "epsilon": 1e-6, "relative_epsilon": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        inverse_pth_root(**args)


# ------------------------------------------------------------- fractional exponents and pseudo-inverse


@pytest.mark.parametrize("p", [0.5, 1.5, 8 / 3, 3.0, 6.0])
@pytest.mark.parametrize("relative, epsilon", [(True, 1e-6), (False, 1e-13)])
def test_fractional_root_matches_reference(p, relative, epsilon):
    # Exponent multipliers give p = 2k/m: −1/2 and −1/3 per factor are p = 2 and 3, p = 8/3 is m = 3/2.
    gen = torch.Generator().manual_seed(int(100 * p) + relative)
    s = _spectrum(3, 24, 1e6, gen)
    _check_against_reference(s, _orthogonal(3, 24, gen), p, epsilon, relative, "eigh")


def test_newton_takes_an_integral_float_p():
    gen = torch.Generator().manual_seed(18)
    a = _compose(_orthogonal(2, 10, gen), _spectrum(2, 10, 1e3, gen))
    kwargs = {"epsilon": 1e-6, "relative_epsilon": True, "method": "newton"}
    assert torch.equal(inverse_pth_root(a, 4.0, **kwargs).root, inverse_pth_root(a, 4, **kwargs).root)


def _pseudo_reference(q: torch.Tensor, s: torch.Tensor, p: float) -> torch.Tensor:
    kept = s > 0
    return _compose(q, torch.where(kept, s, 1.0).pow(-1.0 / p) * kept)


@pytest.mark.parametrize("relative, epsilon", [(True, 1e-6), (False, 1e-8)])
@pytest.mark.parametrize("p", [2, 4, 1.5])
def test_pseudo_inverse_root_matches_reference_and_annihilates_the_null_space(p, relative, epsilon):
    gen = torch.Generator().manual_seed(19 + int(2 * p))
    for d, rank in [(8, 1), (33, 10), (64, 48)]:
        s = _spectrum(2, d, 1e3, gen, rank=rank)  # kept eigenvalues ≥ 1e-3, far above either threshold
        q = _orthogonal(2, d, gen)
        result = inverse_pth_root(_compose(q, s), p, epsilon=epsilon, relative_epsilon=relative,
                                  pseudo_inverse=True)
        assert result.accepted.all() and (result.residual <= 1e-12).all()
        kappa = s[:, 0] / s[:, rank - 1]  # of the kept part: the null part is not inverted
        error = _relative_error(result.root, _pseudo_reference(q, s, p))
        assert (error <= 10 * kappa * UNIT_ROUNDOFF + 1e-12).all(), (error, kappa)
        null = q[..., rank:]
        leak = torch.linalg.matrix_norm(result.root @ null) / torch.linalg.matrix_norm(result.root, ord=2)
        assert (leak <= 10 * kappa * UNIT_ROUNDOFF * math.sqrt(d)).all(), leak


def test_pseudo_inverse_drops_exactly_the_eigenvalues_at_or_below_the_threshold():
    gen = torch.Generator().manual_seed(20)
    s = torch.tensor([[4.0, 1.0, 1e-3, 2e-4, 1e-5, 0.0]], dtype=torch.float64)
    q = _orthogonal(1, 6, gen)
    result = inverse_pth_root(_compose(q, s), 2, epsilon=1e-4, relative_epsilon=True, pseudo_inverse=True)
    # Threshold 1e-4·λ_max = 4e-4: 1e-3 is kept, 2e-4 and below are dropped.
    expected = _compose(q, torch.tensor([[0.5, 1.0, 1e-3**-0.5, 0.0, 0.0, 0.0]], dtype=torch.float64))
    assert _relative_error(result.root, expected) <= 1e-11


def test_pseudo_inverse_rejects_materially_indefinite_input_and_returns_zero_for_zero():
    gen = torch.Generator().manual_seed(21)
    s = torch.tensor([[1.0, 0.3, -0.5, 0.0, 0.0]], dtype=torch.float64)
    result = inverse_pth_root(_compose(_orthogonal(1, 5, gen), s), 2, epsilon=1e-6, relative_epsilon=True,
                              pseudo_inverse=True)
    assert not result.accepted.any() and (result.residual > 0.1).all()  # the dropped −0.5 is not roundoff
    zero = inverse_pth_root(torch.zeros(4, 4), 2, epsilon=1e-6, relative_epsilon=True, pseudo_inverse=True)
    assert zero.accepted.item() and torch.equal(zero.root, torch.zeros(4, 4))


# ---------------------------------------------------------------------------------- float32 eigh


U32 = 2.0**-24


def _contract_bound(a32, a, s, p, ridge, eta, omega):
    """The docstring's bound on ‖X − X*‖_F/‖X*‖₂ for X* the exact root of the fp64 ``a``.

    δ bounds ‖S̃ − S‖_F for the symmetric matrix S̃ that the float32 decomposition exactly diagonalizes:
    its backward error, the step to orthonormal vectors, and the rounding of ``a`` to float32.
    """
    norm_f = torch.linalg.matrix_norm(a)
    delta = eta * norm_f + omega * s.amax(dim=-1) + torch.linalg.matrix_norm(a32.double() - a)
    m = s.clamp_min(0).amin(dim=-1) + ridge
    lo = torch.maximum(ridge, m - delta)
    d = a.shape[-1]
    return (m / lo).pow(1.0 / p) * (delta / (p * lo) + omega) + 4 * d * U32


@pytest.mark.parametrize("d", [16, 64, 256])
@pytest.mark.parametrize("epsilon", [1e-3, 1e-5])
@pytest.mark.parametrize("p", [2, 4, 1.5])
def test_float32_eigh_root_meets_its_accuracy_contract(d, epsilon, p):
    from lightning_shampoo.eigen import check_threshold, checked_eigh

    gen = torch.Generator().manual_seed(d + int(1e6 * epsilon) + int(10 * p))
    conditions = [1e2, 1e4, 1e8]
    s = torch.cat([_spectrum(1, d, c, gen) for c in conditions])
    q = _orthogonal(len(conditions), d, gen)
    a = _compose(q, s)
    a32 = a.float()  # the optimizer's factors are float32
    result = inverse_pth_root(a32, p, epsilon=epsilon, relative_epsilon=True, eigh_dtype=torch.float32)
    assert result.accepted.all() and result.root.dtype == torch.float32
    ridge = epsilon * s.amax(dim=-1)
    reference = _compose(q, (s + ridge[:, None]).pow(-1.0 / p))
    scale = torch.linalg.matrix_norm(reference, ord=2)
    error = torch.linalg.matrix_norm(result.root.double() - reference) / scale
    decomposition = checked_eigh(0.5 * (a32 + a32.mT), dtype=torch.float32)  # what inverse_pth_root saw
    eta, omega = decomposition.backward_error.double(), decomposition.orthogonality.double()
    tau = check_threshold(d, torch.float32)
    assert (eta <= tau).all() and (omega <= tau).all()  # the check's guarantee: the a-priori form rests on it
    bound = _contract_bound(a32, a, s, p, ridge, eta, omega)
    assert (error <= bound).all(), (error, bound)
    # The residual: η + ω + the relative size of the clamped negative eigenvalues (roundoff-sized here).
    values = decomposition.values.double()
    clamped = torch.linalg.vector_norm(values.clamp_max(0), dim=-1) / torch.linalg.vector_norm(values, dim=-1)
    torch.testing.assert_close(result.residual, eta + omega + clamped, rtol=1e-12, atol=0.0)
    assert (clamped <= 2 * eta + omega).all()
    # Typical accuracy in the spectral norm, as the docstring quotes it: measured ≤ 17·u/(p·ε) here and
    # ≤ 30·u/(p·ε) up to d = 1024 (ε relative to λ_min + ridge, which is ε for ill-conditioned S).
    spectral = torch.linalg.matrix_norm(result.root.double() - reference, ord=2) / scale
    epsilon_effective = (s.amin(dim=-1) + ridge) / s.amax(dim=-1)
    assert (spectral <= 64 * U32 / (p * epsilon_effective) + 4 * d * U32).all()


def test_float32_eigh_with_forced_fallback_has_float64_accuracy():
    gen = torch.Generator().manual_seed(22)
    d = 48
    a = _compose(_orthogonal(3, d, gen), _spectrum(3, d, 1e8, gen)).float()
    kwargs = {"epsilon": 1e-6, "relative_epsilon": True}
    wide = inverse_pth_root(a, 4, **kwargs)
    fast = inverse_pth_root(a, 4, eigh_dtype=torch.float32, **kwargs)
    forced = inverse_pth_root(a, 4, eigh_dtype=torch.float32, eigh_tolerance=1e-12, **kwargs)
    assert forced.accepted.all() and fast.accepted.all()
    # A float64 decomposition rounded to float32 gives each eigenvalue to float32's relative precision, so the
    # root is as good as float64's up to the last rounding (≤ 1e-6 here), far better than the float32 solver
    # (a few percent at ε = 1e-6, see test_float32_eigh_root_meets_its_accuracy_contract).
    assert (_relative_error(forced.root.double(), wide.root.double()) <= 1e-6).all()
    assert (_relative_error(fast.root.double(), wide.root.double()) > 1e-4).all()


def test_float32_eigh_is_deterministic_batched_and_isolates_non_finite_input():
    gen = torch.Generator().manual_seed(23)
    d = 20
    a = _compose(_orthogonal(4, d, gen), _spectrum(4, d, 1e5, gen)).float()
    poisoned = a.clone()
    poisoned[2, 1, 1] = math.nan
    before = poisoned.clone()
    kwargs = {"epsilon": 1e-5, "relative_epsilon": True, "eigh_dtype": torch.float32}
    first, second = inverse_pth_root(poisoned, 2, **kwargs), inverse_pth_root(poisoned, 2, **kwargs)
    torch.testing.assert_close(poisoned, before, rtol=0.0, atol=0.0, equal_nan=True)  # untouched
    torch.testing.assert_close(first.root, second.root, rtol=0.0, atol=0.0, equal_nan=True)  # same bits
    assert torch.isnan(first.root[2]).all()
    assert torch.equal(first.residual, second.residual)
    assert first.accepted.tolist() == [True, True, False, True]
    for i in (0, 1, 3):
        single = inverse_pth_root(a[i], 2, **kwargs)
        torch.testing.assert_close(first.root[i], single.root, rtol=1e-6, atol=0.0)
