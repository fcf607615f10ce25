"""Checked symmetric eigendecompositions and warm-started eigenbases of batched symmetric PSD factors.

Two public functions, both batched over all leading dims (Python loops only over the matrices that fail):

- :func:`checked_eigh`: ``S = Q diag(λ) Qᵀ`` in a chosen precision, each result checked; a float32
  result that fails its check is recomputed in float64 (that matrix only).
- :func:`eigenbasis`: the eigenvectors of each factor for eigenvalue-corrected Shampoo (SOAP), warm-started
  from the previous basis by power iteration + QR where that basis is still close.

**The check.** For a computed ``(λ̂, Q̂)`` of ``S``, in the compute precision (unit roundoff ``u``):
``η = ‖Q̂ diag(λ̂) Q̂ᵀ − S‖_F / ‖S‖_F`` (backward error) and ``ω = ‖Q̂ᵀQ̂ − I‖_F`` (loss of
orthogonality); it passes when both are finite and at most ``τ = 32·d·u`` (LAPACK's eigensolver tests use
these two ratios over ``d·u``). Costs two batched matmuls, about 7–30% of a float32 ``eigh`` on CPU at
d = 128–1024. Measured with LAPACK on CPU (d = 8–1024, spectra geometric, flat, clustered, rank-deficient):
η ≈ 10–30·u, ω ≈ d·u, so a sound decomposition passes with a margin of 30× or more and a broken one
(η or ω of order 1) fails.

**Determinism.** Same input, same thread count → same bits: every step is a fixed sequence of LAPACK/BLAS
calls; the fallback set is a function of the input. The input is never modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor

EIGH_DTYPES = (torch.float32, torch.float64)
CHECK_SLACK = 32  # τ = CHECK_SLACK·d·u: see the module docstring


def default_eigh_dtype(device: torch.device) -> torch.dtype:
    """The faster precision on ``device`` where the user chose none: float32 (checked, float64 fallback)
    on the CPU, float64 on CUDA. Measured: a float32 ``eigh`` took about half the time of a float64 one on
    the 2-core CPU, while on an H200 (cuSOLVER, torch 2.11) float64 was 2.6×, 5× and 5.4× faster at
    d = 128, 256 and 512 (batched, per matrix) and its roots are exact to 1e-11 instead of 1e-4."""
    return torch.float64 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class Eigendecomposition:
    """``S = Q diag(values) Qᵀ`` for a batch ``(n, d, d)``, with its check.

    values: ``(n, d)`` ascending; vectors: ``(n, d, d)``, column ``i`` belongs to ``values[:, i]``; both in
        the compute dtype (a float64 fallback is rounded to it). Placeholders ``0`` and ``I`` where ``ok``
        is False because no decomposition could be computed.
    backward_error: ``(n,)`` float64, η of the returned decomposition.
    orthogonality: ``(n,)`` float64, ω of the returned vectors.
    ok: ``(n,)`` the decomposition passed its check (the float64 one's, where it fell back).
    fallback: ``(n,)`` recomputed in float64 because the first attempt failed its check or raised.
    """

    values: Tensor
    vectors: Tensor
    backward_error: Tensor
    orthogonality: Tensor
    ok: Tensor
    fallback: Tensor


@dataclass(frozen=True)
class BasisResult:
    """Eigenbases of a batch of factors and how each was obtained.

    basis: ``(..., d, d)`` in the input dtype, orthonormal columns; NaN where not accepted for lack of a
        finite factor or decomposition.
    residual: ``(...,)`` float64, the relative off-diagonal mass ``‖B − diag(B)‖_F / ‖S‖_F`` of
        ``B = Qᵀ S Q`` (for a full decomposition its backward error η, which bounds that mass); ``+inf``
        where not accepted.
    accepted: ``(...,)`` bool, a finite basis orthonormal within ``τ = 32·d·u``.
    full: ``(...,)`` bool, a full eigendecomposition was computed (no usable previous basis, or it had
        drifted past ``restart``).
    kept: ``(...,)`` bool, the previous basis is returned unchanged (bitwise): it was within ``tolerance``.
    """

    basis: Tensor
    residual: Tensor
    accepted: Tensor
    full: Tensor
    kept: Tensor


def check_threshold(d: int, dtype: torch.dtype) -> float:
    """``τ = 32·d·u``: the largest ``η`` and ``ω`` a decomposition of a ``d × d`` matrix may have."""
    return CHECK_SLACK * d * torch.finfo(dtype).eps / 2


def validate_matrices(matrices: Tensor, name: str) -> None:
    """Raise unless ``matrices`` is a floating ``(..., d, d)`` stack."""
    if matrices.ndim < 2 or matrices.shape[-1] != matrices.shape[-2]:
        raise ValueError(
            f"{name} must be square with shape (..., d, d); got {tuple(matrices.shape)}. "
            "Pass a stack of symmetric matrices."
        )
    if not matrices.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype; got {matrices.dtype}. Cast them first.")


def symmetrized(matrices: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(S + Sᵀ)/2`` of ``matrices (..., d, d)`` as ``(n, d, d)`` in ``dtype``, and ``(n,)`` finiteness.

    Accumulated statistics are symmetric only up to roundoff; ``eigh`` reads one triangle, so the
    symmetric part is what every method must see. Non-finite matrices are replaced by ``I`` so that one
    of them cannot break a batched call; the mask says which. Always a fresh tensor.
    """
    d = matrices.shape[-1]
    flat = matrices.reshape(-1, d, d).to(dtype)
    sym = 0.5 * (flat + flat.mT)
    # One reduction instead of an elementwise isfinite: NaN and ±inf survive a float64 sum, which cannot
    # overflow for float32 or float64 entries of a real factor.
    finite = sym.sum(dim=(-2, -1), dtype=torch.float64).isfinite()
    if not finite.all():
        sym[~finite] = torch.eye(d, dtype=dtype, device=sym.device)
    return sym, finite


def checked_eigh(matrices: Tensor, *, dtype: torch.dtype = torch.float32,
                 tolerance: float | None = None) -> Eigendecomposition:
    """Eigendecomposition of finite symmetric ``matrices (n, d, d)`` in ``dtype``, checked per matrix.

    ``tolerance`` replaces ``τ = 32·d·u(dtype)`` for the first attempt (a tiny value forces the fallback).
    With ``dtype=torch.float32`` every matrix that fails it, or whose ``eigh`` raises, is recomputed in
    float64 (checked against float64's own ``τ``) and rounded to float32; the rounding adds about ``u₃₂`` to
    η and ω, which are reported for the returned float32 tensors. With ``dtype=torch.float64`` there is no
    fallback: ``ok`` says whether it passed.
    """
    if dtype not in EIGH_DTYPES:
        raise ValueError(f"eigh dtype must be one of {EIGH_DTYPES}; got {dtype}.")
    d = matrices.shape[-1]
    threshold = check_threshold(d, dtype) if tolerance is None else tolerance
    sym = matrices.to(dtype)
    values, vectors, ok = _eigh_each(sym)
    backward, orthogonality = decomposition_errors(sym, values, vectors)
    ok = ok & _passes(backward, orthogonality, threshold)
    fallback = torch.zeros_like(ok) if dtype == torch.float64 else ~ok
    if fallback.any():
        index = fallback.nonzero().squeeze(-1)
        wide = sym[index].to(torch.float64)
        wide_values, wide_vectors, wide_ok = _eigh_each(wide)
        wide_ok = wide_ok & _passes(*decomposition_errors(wide, wide_values, wide_vectors),
                                    check_threshold(d, torch.float64))
        values[index], vectors[index] = wide_values.to(dtype), wide_vectors.to(dtype)
        rounded = decomposition_errors(sym[index], values[index], vectors[index])
        backward[index], orthogonality[index] = rounded
        ok[index] = wide_ok & rounded[0].isfinite() & rounded[1].isfinite()
    return Eigendecomposition(values, vectors, backward, orthogonality, ok, fallback)


def decomposition_errors(matrices: Tensor, values: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """``(η, ω)`` of ``(values, vectors)`` as a decomposition of ``matrices``, each ``(n,)`` float64."""
    reconstruction = torch.baddbmm(matrices, vectors * values[:, None, :], vectors.mT, beta=-1)
    return relative_frobenius(reconstruction, matrices), _orthogonality(vectors)


def relative_frobenius(error: Tensor, reference: Tensor) -> Tensor:
    """``‖error‖_F / ‖reference‖_F`` per matrix, float64, ``0`` where both are 0."""
    return frobenius(error) / frobenius(reference).clamp_min(torch.finfo(torch.float64).tiny)


def frobenius(matrices: Tensor) -> Tensor:
    """``‖X‖_F`` per matrix, float64, safe from under- and overflow of the sum of squares.

    Squares of float32 statistics leave float32's range for entries below ~1e-19 or above ~1e19 (entries of
    1e-20 are ordinary for small gradients): matrices whose norm comes out near those limits are summed
    again in float64, the rest cost one fast pass.
    """
    norm = torch.linalg.matrix_norm(matrices).to(torch.float64)
    info = torch.finfo(matrices.dtype)
    risky = ~((norm >= math.sqrt(info.tiny) / info.eps) & (norm <= math.sqrt(info.max) * info.eps))
    if risky.any():
        norm[risky] = torch.linalg.vector_norm(matrices[risky], dim=(-2, -1), dtype=torch.float64)
    return norm


def _passes(backward: Tensor, orthogonality: Tensor, threshold: float) -> Tensor:
    # NaN compares False, so a non-finite decomposition fails.
    return (backward <= threshold) & (orthogonality <= threshold)


def _eigh_each(matrices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batched ``eigh``; if it raises, retry matrix by matrix so one bad matrix fails alone.

    Failed matrices get eigenvalues 0 and ``Q = I`` as placeholders and ``ran = False``.
    """
    n, d = matrices.shape[0], matrices.shape[-1]
    try:
        values, vectors = torch.linalg.eigh(matrices)
        return values, vectors, torch.ones(n, dtype=torch.bool, device=matrices.device)
    except torch.linalg.LinAlgError:
        pass
    values = matrices.new_zeros(n, d)
    vectors = torch.eye(d, dtype=matrices.dtype, device=matrices.device).repeat(n, 1, 1)
    ran = torch.zeros(n, dtype=torch.bool, device=matrices.device)
    for i in range(n):
        try:
            values[i], vectors[i] = torch.linalg.eigh(matrices[i])
            ran[i] = True
        except torch.linalg.LinAlgError:
            continue
    return values, vectors, ran


def eigenbasis(
    factors: Tensor,
    previous: Tensor | None = None,
    *,
    tolerance: float = 0.01,
    restart: float = 0.1,
    power_iterations: int = 1,
    dtype: torch.dtype = torch.float32,
) -> BasisResult:
    """Orthonormal eigenvectors ``Q`` of every symmetric PSD factor ``S`` in ``factors (..., d, d)``.

    The quality of a basis ``Q`` for ``S`` is ``c = ‖B − diag(B)‖_F / ‖S‖_F`` with ``B = Qᵀ S Q``. For an
    orthonormal ``Q`` this is exactly the relative error of ``S ≈ Q diag(B) Qᵀ``, the approximation an
    eigenvalue-corrected preconditioner makes in that basis; it ignores rotations inside (near-)degenerate
    eigenspaces, where the basis is not determined and does not matter, and weighs every other rotation by
    the eigenvalue gap it spans. (Meta's DistributedShampoo uses the same ratio for its adaptive
    refreshes, after "Purifying Shampoo".)

    Without ``previous``: a checked :func:`checked_eigh` in ``dtype`` (float32 → float64 fallback per
    matrix). With ``previous`` (the last basis, same shape), per matrix, from ``c₀`` of that basis at the new
    ``S``:

    - ``c₀ ≤ tolerance``: the previous basis is kept, bitwise (``kept``); the refresh cost three matmuls
      (its orthonormality check included).
    - ``tolerance < c₀ ≤ restart``: up to ``power_iterations`` steps of ``Q ← qr(S Q)`` (SOAP's update),
      stopping once ``c ≤ tolerance``.
    - ``c₀ > restart``, a previous basis that is non-finite or not orthonormal within ``τ``, or a warm
      result that fails the same check: full decomposition (``full``).

    The default ``restart = 10·tolerance`` comes from measurement: one step lowers ``c`` about tenfold
    from any start (geometric and Wishart spectra, d = 256) and then ~1/k per step, so a basis with
    ``c₀ ≤ 0.1`` lands near 0.01 after one step while a larger drift would take many. Cost on CPU (roots
    figure, d = 128–1024): a warm step (QR and six matmuls, checks included) takes 1.2–1.6× a full float32
    decomposition, a kept basis 0.35–0.5×; there ``restart = tolerance`` (keep or decompose) is cheaper,
    and the warm step pays only where QR is much cheaper than ``eigh``. ``tolerance = 0`` and
    ``restart ≥ 1`` give SOAP's unconditional warm refresh.

    Column order: descending by eigenvalue (``diag(B)``) for computed bases; a power step sorts its start
    that way first, which keeps the iteration stable (ascending columns would be amplified by
    ``λ_max/λ_min`` towards the top eigenvector). Column signs make ``diag(R)`` of the QR non-negative, so a
    converged warm step returns ``≈ Q_prev`` rather than flipped columns. A kept basis keeps its own order.
    Non-finite factors give NaN bases, ``accepted = False``, and leave the rest of the batch unaffected.
    """
    _validate_basis(factors, previous, tolerance, restart, power_iterations, dtype)
    d = factors.shape[-1]
    batch_shape = factors.shape[:-2]
    matrices, finite = symmetrized(factors, dtype)
    n = matrices.shape[0]
    basis = torch.empty_like(matrices)
    residual = torch.full((n,), math.inf, dtype=torch.float64, device=matrices.device)
    accepted = torch.zeros(n, dtype=torch.bool, device=matrices.device)
    kept = torch.zeros_like(accepted)
    full = finite.clone()  # cleared below for the matrices the warm start serves
    if previous is not None:
        index = finite.nonzero().squeeze(-1)
        start = previous.reshape(-1, d, d).to(dtype)
        warm = _warm_start(matrices[index], start[index], tolerance, restart, power_iterations,
                           check_threshold(d, dtype))
        index = index[warm.done]
        basis[index], residual[index] = warm.basis[warm.done], warm.mass[warm.done]
        kept[index], accepted[index], full[index] = warm.kept[warm.done], True, False
    index = full.nonzero().squeeze(-1)
    if index.numel():
        decomposition = checked_eigh(matrices[index], dtype=dtype)
        basis[index] = decomposition.vectors.flip(-1)
        residual[index] = decomposition.backward_error
        accepted[index] = decomposition.ok
    # Every accepted basis passed an orthonormality check, so it is finite; |Q| ≤ 1 survives any cast.
    basis[~accepted] = math.nan
    residual[~accepted] = math.inf
    return BasisResult(
        basis=basis.to(factors.dtype).reshape(factors.shape),
        residual=residual.reshape(batch_shape),
        accepted=accepted.reshape(batch_shape),
        full=full.reshape(batch_shape),
        kept=kept.reshape(batch_shape),
    )


def off_diagonal_mass(projected: Tensor, matrices: Tensor) -> Tensor:
    """``c = ‖B − diag(B)‖_F / ‖S‖_F`` per matrix (float64) for ``B = Qᵀ S Q`` (``projected``) and ``S``."""
    off = projected.clone()
    off.diagonal(dim1=-2, dim2=-1).zero_()
    return relative_frobenius(off, matrices)


@dataclass(frozen=True)
class _Warm:
    """The warm path's outcome per matrix: ``done`` ones need no full decomposition."""

    basis: Tensor
    mass: Tensor
    done: Tensor
    kept: Tensor


def _warm_start(
    matrices: Tensor, start: Tensor, tolerance: float, restart: float, iterations: int, threshold: float
) -> _Warm:
    """Keep, or power-iterate from, the ``start`` bases of finite ``matrices`` ``(m, d, d)``.

    ``done``: kept, or warm results that passed the orthonormality check. A start that is not orthonormal
    (or not finite: its check is NaN) is neither; its matrix needs a full decomposition.
    """
    orthonormal = _orthogonality(start) <= threshold
    product = matrices @ start
    projected = start.mT @ product
    mass = off_diagonal_mass(projected, matrices)
    # NaN masses compare False: such a matrix is neither kept nor iterated.
    kept = orthonormal & (mass <= tolerance)
    warm = orthonormal & (mass > tolerance) & (mass <= restart)
    basis = start.clone()
    active = warm.clone()
    for _ in range(iterations):
        index = active.nonzero().squeeze(-1)
        if index.numel() == 0:
            break
        q = _power_step(product[index], projected[index])
        product[index] = matrices[index] @ q
        projected[index] = q.mT @ product[index]
        basis[index] = q
        mass[index] = off_diagonal_mass(projected[index], matrices[index])
        active[index] = mass[index] > tolerance
    index = warm.nonzero().squeeze(-1)
    warm[index] = (_orthogonality(basis[index]) <= threshold) & mass[index].isfinite()
    return _Warm(basis, mass, kept | warm, kept)


def _orthogonality(vectors: Tensor) -> Tensor:
    """``ω = ‖QᵀQ − I‖_F`` per matrix, float64."""
    identity = torch.eye(vectors.shape[-1], dtype=vectors.dtype, device=vectors.device)
    return frobenius(torch.baddbmm(identity, vectors.mT, vectors, beta=-1))


def _power_step(product: Tensor, projected: Tensor) -> Tensor:
    """``qr(S Q)`` with the columns of ``S Q`` first sorted by descending ``diag(Qᵀ S Q)``, signs fixed."""
    order = torch.diagonal(projected, dim1=-2, dim2=-1).argsort(dim=-1, descending=True, stable=True)
    q, r = torch.linalg.qr(product.gather(-1, order[:, None, :].expand_as(product)))
    signs = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    return q * signs[:, None, :]


def _validate_basis(
    factors: Tensor, previous: Tensor | None, tolerance: float, restart: float, iterations: int,
    dtype: torch.dtype,
) -> None:
    validate_matrices(factors, "factors")
    if previous is not None and previous.shape != factors.shape:
        raise ValueError(
            f"previous must have the factors' shape {tuple(factors.shape)}; got {tuple(previous.shape)}. "
            "Pass the bases returned for these factors last time, or None for a full decomposition."
        )
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"tolerance must be in [0, 1] (a relative off-diagonal mass); got {tolerance}.")
    if not restart >= tolerance:
        raise ValueError(f"restart must be >= tolerance ({tolerance}); got {restart}. 1.0 never restarts.")
    if isinstance(iterations, bool) or not isinstance(iterations, Integral) or iterations < 1:
        raise ValueError(f"power_iterations must be an integer >= 1; got {iterations!r}.")
    if dtype not in EIGH_DTYPES:
        raise ValueError(f"dtype must be one of {EIGH_DTYPES}; got {dtype}.")
