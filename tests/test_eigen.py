"""Checked eigendecompositions and eigenbases against an fp64 reference built from a known spectrum.

Test matrices are ``S = V diag(s) Vᵀ`` with a random orthogonal ``V`` (fp64), so the eigenvectors are known
without calling a solver. Eigenvector tolerances follow from the Davis–Kahan bound: a backward error ``E``
turns an eigenvector with gap ``g`` to the rest of the spectrum by at most ``‖E‖₂/g``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_shampoo.eigen import check_threshold, checked_eigh, decomposition_errors, eigenbasis

U32 = 2.0**-24


def _orthogonal(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]


def _compose(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    a = (v * s[:, None, :]) @ v.mT
    return 0.5 * (a + a.mT)


def _geometric(n: int, d: int, condition: float) -> torch.Tensor:
    """Descending, λ_max = 1, adjacent ratio condition^(1/(d−1)): every eigenvalue simple."""
    return torch.logspace(0, -math.log10(condition), d, dtype=torch.float64).expand(n, d)


def _rotation(d: int, angle: float, gen: torch.Generator) -> torch.Tensor:
    """``exp(angle·K)`` for a random skew ``K`` of unit-order entries: turns every direction by ~angle."""
    k = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return torch.linalg.matrix_exp(angle * (k - k.mT) / math.sqrt(2 * d))


def _mass(basis: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Reference ``‖B − diag B‖_F/‖S‖_F`` of ``B = Qᵀ S Q``, in fp64."""
    q = basis.double()
    b = q.mT @ s.double() @ q
    off = b - torch.diag_embed(torch.diagonal(b, dim1=-2, dim2=-1))
    return torch.linalg.matrix_norm(off) / torch.linalg.matrix_norm(s.double())


# ------------------------------------------------------------------------------------------ checked_eigh


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d, condition", [(2, 1e2), (8, 1e6), (33, 1e12), (128, 1e4), (256, 1e8)])
def test_checked_eigh_matches_the_known_spectrum(dtype, d, condition):
    gen = torch.Generator().manual_seed(d)
    s = _geometric(2, d, condition)
    a = _compose(_orthogonal(2, d, gen), s).to(dtype)
    result = checked_eigh(a, dtype=dtype)
    assert result.ok.all() and not result.fallback.any()
    assert result.values.dtype == result.vectors.dtype == dtype
    tau = check_threshold(d, dtype)
    assert (result.backward_error <= tau).all() and (result.orthogonality <= tau).all()
    # The reported errors are those of the returned tensors (recomputed here in fp64).
    eta, omega = decomposition_errors(a.double(), result.values.double(), result.vectors.double())
    slack = 4 * d * torch.finfo(dtype).eps  # the check's own rounding
    torch.testing.assert_close(result.backward_error.double(), eta, rtol=0.05, atol=slack)
    torch.testing.assert_close(result.orthogonality.double(), omega, rtol=0.05, atol=slack)
    # Weyl: each eigenvalue moves by at most the backward error (plus the input's own rounding, ≤ u‖S‖_F).
    norm = torch.linalg.matrix_norm(a.double())
    slack = (result.backward_error.double() * norm + result.orthogonality.double() + U32 * norm)[:, None]
    assert ((result.values.double() - s.flip(-1)).abs() <= 2 * slack).all()


def test_forced_fallback_recomputes_in_float64_per_matrix():
    gen = torch.Generator().manual_seed(1)
    d = 24
    a = _compose(_orthogonal(3, d, gen), _geometric(3, d, 1e6)).float()
    forced = checked_eigh(a, dtype=torch.float32, tolerance=1e-12)
    assert forced.fallback.all() and forced.ok.all() and forced.values.dtype == torch.float32
    reference_values, reference_vectors = torch.linalg.eigh(a.double())
    # The float64 result rounded once: float32 rounding of each entry, no float32 solver error.
    torch.testing.assert_close(forced.values, reference_values.float(), rtol=U32, atol=0.0)
    alignment = (forced.vectors.double().mT @ reference_vectors).abs()
    torch.testing.assert_close(alignment, torch.eye(d, dtype=torch.float64).expand(3, d, d), rtol=0.0,
                               atol=1e-6)


def _break_float32_eigh(monkeypatch, bad: torch.Tensor, *, raise_error: bool) -> None:
    """Make ``torch.linalg.eigh`` fail on ``bad`` in float32 only, as a broken low-precision kernel would.

    ``raise_error``: raise for any batch holding ``bad``; else return silently with the eigenvectors of its
    two largest eigenvalues exchanged (eigh sorts ascending): orthonormal, but paired with the wrong values.
    """
    real_eigh = torch.linalg.eigh

    def broken_eigh(x, *args, **kwargs):
        hit = (x == bad).all(dim=(-2, -1)) & (x.dtype == torch.float32)
        if raise_error and hit.any():
            raise torch.linalg.LinAlgError("forced failure")
        values, vectors = real_eigh(x, *args, **kwargs)
        d = vectors.shape[-1]
        swapped = vectors[..., [*range(d - 2), d - 1, d - 2]]
        return values, torch.where(hit[..., None, None], swapped, vectors)

    monkeypatch.setattr(torch.linalg, "eigh", broken_eigh)


def test_silently_wrong_float32_result_fails_the_check_and_falls_back(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    d = 10
    a = _compose(_orthogonal(3, d, gen), _geometric(3, d, 1e3)).float()
    clean = checked_eigh(a, dtype=torch.float32)
    _break_float32_eigh(monkeypatch, a[1], raise_error=False)
    eta, omega = decomposition_errors(a, *torch.linalg.eigh(a))
    tau = check_threshold(d, torch.float32)
    assert eta[1] > 0.1 and (eta[[0, 2]] <= tau).all()  # the check sees it
    assert (omega <= tau).all()  # a swap keeps the columns orthonormal
    result = checked_eigh(a, dtype=torch.float32)
    assert result.fallback.tolist() == [False, True, False] and result.ok.all()
    assert torch.equal(result.values[[0, 2]], clean.values[[0, 2]])
    assert torch.equal(result.vectors[[0, 2]], clean.vectors[[0, 2]])
    assert (result.backward_error <= tau).all()


def test_float32_solver_error_falls_back_for_that_matrix_only(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    a = _compose(_orthogonal(4, 7, gen), _geometric(4, 7, 1e2)).float()
    clean = checked_eigh(a, dtype=torch.float32)
    _break_float32_eigh(monkeypatch, a[2], raise_error=True)
    result = checked_eigh(a, dtype=torch.float32)
    assert result.fallback.tolist() == [False, False, True, False] and result.ok.all()
    keep = [0, 1, 3]
    assert torch.equal(result.vectors[keep], clean.vectors[keep])
    torch.testing.assert_close(result.values[2], clean.values[2], rtol=1e-5, atol=0.0)


def test_float64_failure_is_reported_not_retried(monkeypatch):
    a = torch.eye(3, dtype=torch.float64).expand(2, 3, 3).clone()

    def failing_eigh(x, *args, **kwargs):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    result = checked_eigh(a, dtype=torch.float64)
    assert not result.ok.any() and not result.fallback.any()


# ------------------------------------------------------------------------------------------- eigenbasis


def _spread(n: int, d: int) -> torch.Tensor:
    """Descending eigenvalues 2, 2·r, … with gaps ≥ 1/d of λ_max: every eigenvector well determined."""
    return torch.linspace(2.0, 0.1, d, dtype=torch.float64).expand(n, d)


def test_full_basis_diagonalizes_and_matches_the_known_eigenvectors():
    gen = torch.Generator().manual_seed(4)
    n, d = 3, 48
    v = _orthogonal(n, d, gen)
    s = _spread(n, d)
    a = _compose(v, s).float()
    result = eigenbasis(a)
    assert result.full.all() and result.accepted.all() and not result.kept.any()
    assert result.basis.dtype == torch.float32
    # Descending columns, matching the known (descending) eigenvectors up to sign: gap 1.9/47 ≈ 0.04,
    # backward error ~32·d·u·‖S‖_F ≈ 1e-3 at most → angles ≤ 0.03; the sound solver lands far below.
    alignment = (result.basis.double().mT @ v).abs()
    torch.testing.assert_close(alignment, torch.eye(d, dtype=torch.float64).expand(n, d, d), rtol=0.0,
                               atol=1e-4)
    mass = _mass(result.basis, a)
    assert (mass <= result.residual * 1.05 + 1e-7).all()  # the residual bounds the off-diagonal mass
    assert (result.residual <= check_threshold(d, torch.float32)).all()


def test_unchanged_factor_keeps_the_basis_bitwise():
    gen = torch.Generator().manual_seed(5)
    a = _compose(_orthogonal(2, 20, gen), _geometric(2, 20, 1e4)).float()
    first = eigenbasis(a)
    again = eigenbasis(a, first.basis)
    assert again.kept.all() and not again.full.any() and again.accepted.all()
    assert torch.equal(again.basis, first.basis)
    assert (again.residual <= 0.01).all()


@pytest.mark.parametrize("spectrum", ["spread", "geometric"])
def test_warm_refreshes_track_a_drifting_factor_and_converge(spectrum):
    gen = torch.Generator().manual_seed(6)
    n, d = 2, 32
    v = _orthogonal(n, d, gen)
    s = _spread(n, d) if spectrum == "spread" else _geometric(n, d, 1e6)
    step = _rotation(d, 0.02, gen)  # c₀ ≈ 1.3·angle per refresh: between tolerance and restart
    basis = eigenbasis(_compose(v, s).float()).basis
    for _ in range(5):
        v = step @ v
        a = _compose(v, s).float()
        result = eigenbasis(a, basis)
        assert not result.full.any() and not result.kept.any() and result.accepted.all()
        assert (_mass(result.basis, a) <= result.residual + 1e-6).all()
        assert (result.residual <= 0.01).all()  # one power step from c₀ ≈ 0.026 lands within tolerance
        basis = result.basis
    # The drift stops: further warm refreshes (never keeping, never restarting) converge to the true basis.
    # Simultaneous iteration: each off-diagonal entry shrinks by λ_j/λ_i per step, so the mass falls
    # fast for the geometric spectrum and like ~1/k for the evenly spread one (adjacent ratios ≈ 0.97).
    masses = []
    for _ in range(12):
        result = eigenbasis(a, basis, tolerance=0.0, restart=1.0)
        assert not result.full.any()
        basis = result.basis
        masses.append(_mass(basis, a))
    assert all((later < earlier).all() for earlier, later in itertools.pairwise(masses))
    assert (masses[-1] <= masses[0] / (5 if spectrum == "spread" else 100)).all()
    if spectrum == "geometric":
        # The leading eigenvectors, separated by gaps of ~36% (ratio 0.64), are found to high accuracy;
        # the spread spectrum's 3% gaps make its eigenvectors converge only as slowly as its mass.
        top = 4
        alignment = (basis[..., :top].double().mT @ v[..., :top]).abs()
        torch.testing.assert_close(alignment, torch.eye(top, dtype=torch.float64).expand(n, top, top),
                                   rtol=0.0, atol=1e-3)


def _unchanged_turned_replaced(d: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Three factors after a refresh: unchanged, slightly turned (c₀ ≈ 0.04), replaced by an unrelated one.

    Returns their new eigenvectors (descending), the factors (float32) and the bases of the old factors.
    """
    v = _orthogonal(3, d, gen)
    s = _geometric(3, d, 1e4)
    previous = eigenbasis(_compose(v, s).float()).basis
    new = v.clone()
    new[1] = _rotation(d, 0.03, gen) @ v[1]
    new[2] = _orthogonal(1, d, gen)[0]
    return new, _compose(new, s).float(), previous


def test_large_change_takes_the_full_path_and_small_change_the_warm_one():
    v, a, previous = _unchanged_turned_replaced(24, torch.Generator().manual_seed(7))
    result = eigenbasis(a, previous)
    assert result.kept.tolist() == [True, False, False]
    assert result.full.tolist() == [False, False, True]
    assert result.accepted.all() and (result.residual <= 0.01).all()
    alignment = (result.basis[2].double().mT @ v[2]).abs()
    torch.testing.assert_close(alignment, torch.eye(24, dtype=torch.float64), rtol=0.0, atol=1e-3)


def test_unusable_previous_basis_takes_the_full_path():
    gen = torch.Generator().manual_seed(8)
    d = 12
    a = _compose(_orthogonal(3, d, gen), _geometric(3, d, 1e3)).float()
    previous = eigenbasis(a).basis.clone()
    previous[0] *= 1.01  # not orthonormal
    previous[1, 3, 4] = math.nan
    result = eigenbasis(a, previous)
    assert result.full.tolist() == [True, True, False] and result.kept.tolist() == [False, False, True]
    assert result.accepted.all()


def test_non_finite_factor_is_rejected_alone_and_the_rest_is_unchanged():
    gen = torch.Generator().manual_seed(9)
    d = 16
    v = _orthogonal(4, d, gen)
    s = _geometric(4, d, 1e4)
    basis = eigenbasis(_compose(v, s).float()).basis
    a = _compose(torch.cat([_rotation(d, 0.02, gen) @ v[:2], v[2:]]), s).float()
    poisoned = a.clone()
    poisoned[1, 0, 5] = math.inf
    poisoned[3, 2, 2] = math.nan
    result = eigenbasis(poisoned, basis)
    assert result.accepted.tolist() == [True, False, True, False]
    assert torch.isnan(result.basis[[1, 3]]).all() and torch.isinf(result.residual[[1, 3]]).all()
    assert not result.full[[1, 3]].any() and not result.kept[[1, 3]].any()
    clean = eigenbasis(a[[0, 2]], basis[[0, 2]])
    torch.testing.assert_close(result.basis[[0, 2]], clean.basis, rtol=0.0, atol=1e-6)
    assert result.kept[[0, 2]].tolist() == clean.kept.tolist() == [False, True]


def test_eigenbasis_is_deterministic_and_leaves_its_inputs_alone():
    _, a, previous = _unchanged_turned_replaced(40, torch.Generator().manual_seed(10))
    a_before, previous_before = a.clone(), previous.clone()
    first, second = eigenbasis(a, previous), eigenbasis(a, previous)  # one call of each path
    assert first.kept.tolist() == [True, False, False] and first.full.tolist() == [False, False, True]
    for name in ("basis", "residual", "accepted", "full", "kept"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert torch.equal(a, a_before) and torch.equal(previous, previous_before)


def test_basis_dtype_follows_the_input_and_batch_dims_are_kept():
    gen = torch.Generator().manual_seed(11)
    d = 9
    a = _compose(_orthogonal(6, d, gen), _geometric(6, d, 1e3)).reshape(2, 3, d, d)
    result = eigenbasis(a)
    assert result.basis.shape == a.shape and result.basis.dtype == torch.float64
    assert result.residual.shape == result.accepted.shape == result.full.shape == result.kept.shape == (2, 3)
    float32 = eigenbasis(a.float())
    torch.testing.assert_close(result.basis, float32.basis.double(), rtol=0.0, atol=0.0)  # fp32 compute
    wide = eigenbasis(a, dtype=torch.float64)
    assert (wide.residual <= check_threshold(d, torch.float64)).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"factors": torch.zeros(3, 4)}, "must be square"),
        ({"factors": torch.zeros(3, 3, dtype=torch.int64)}, "floating dtype"),
        ({"previous": torch.eye(4)}, "previous must have the factors' shape"),
        ({"tolerance": -0.1}, "tolerance must be in"),
        ({"tolerance": 0.5, "restart": 0.1}, "restart must be >= tolerance"),
        ({"power_iterations": 0}, "power_iterations must be an integer >= 1"),
        ({"dtype": torch.bfloat16}, "dtype must be one of"),
    ],
)
def test_invalid_eigenbasis_arguments_raise(kwargs, match):
    args = {"factors": torch.eye(3).expand(2, 3, 3), **kwargs}
    with pytest.raises(ValueError, match=match):
        eigenbasis(**args)
