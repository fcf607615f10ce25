"""Inverse p-th roots ``(S + εI)^(−1/p)`` of batched symmetric PSD matrices, and their acceptance check.

The ridge is ``ε`` or, with ``relative_epsilon``, ``ε·λ_max(S)`` per matrix, which caps the condition
number of ``S + εI`` at about ``1/ε``. The input is never modified (adding the ridge to stored
statistics in place would accumulate it forever). The root is returned in the input dtype.

Two methods, both batched over all leading dims (no per-matrix Python loop):

- ``"eigh"``: ``S = Q diag(λ) Qᵀ`` by :func:`.eigen.checked_eigh` in ``eigh_dtype`` (float64, or float32
  with a checked float64 fallback per matrix); ``root = Q diag((max(λ, 0) + ε)^(−1/p)) Qᵀ`` for any real
  ``p > 0``. Negative eigenvalues are roundoff on PSD input and are clamped to 0. With ``pseudo_inverse``
  the eigenvalues at or below the threshold ``ε`` (``ε·λ_max``) are dropped (their root is 0) and the
  others are inverted without a ridge: ``Q diag(λ_kept^(−1/p), 0…) Qᵀ``.
- ``"newton"``: the coupled Newton iteration of Guo & Higham (2006) on ``A = S + εI``, in float64, for an
  integer ``p``: ``z = (1+p)/(2‖A‖_F)``, ``M₀ = zA``, ``H₀ = z^(1/p) I``; repeat ``T = ((p+1)/p) I − M/p``,
  ``M ← T^p M``, ``H ← H T``. The invariant ``M = H^p A`` makes ``H → A^(−1/p)`` as ``M → I``.

A result is accepted when its root is finite and its residual is at most ``max_residual``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor

from .eigen import EIGH_DTYPES, checked_eigh, symmetrized, validate_matrices

METHODS = ("eigh", "newton")


@dataclass(frozen=True)
class RootResult:
    """Roots of a batch of matrices and their checks.

    root: ``(..., d, d)`` in the input dtype, ``(S + εI)^(−1/p)``; non-finite where no root could be
        computed (all-NaN for non-finite input or a failed decomposition).
    residual: ``(...,)`` float64 check value (see :func:`inverse_pth_root`); ``+inf`` for non-finite roots.
    accepted: ``(...,)`` bool, finite root and ``residual <= max_residual``.
    """

    root: Tensor
    residual: Tensor
    accepted: Tensor


def inverse_pth_root(
    matrices: Tensor,
    p: float,
    *,
    epsilon: float,
    relative_epsilon: bool,
    method: str = "eigh",
    max_residual: float = 0.1,
    newton_tolerance: float = 1e-6,
    newton_max_iterations: int = 100,
    pseudo_inverse: bool = False,
    eigh_dtype: torch.dtype = torch.float64,
    eigh_tolerance: float | None = None,
) -> RootResult:
    """``(S + εI)^(−1/p)``, or its pseudo-inverse form, of every symmetric PSD ``S`` in ``(..., d, d)``.

    ``ε = epsilon`` or, with ``relative_epsilon``, ``epsilon·λ_max(S)`` per matrix (from the
    eigendecomposition for ``"eigh"``, by power iteration for ``"newton"``). ``p``: any real ``> 0`` for
    ``"eigh"`` (``2k/m`` for an exponent multiplier ``m``), an integer for ``"newton"``.
    ``pseudo_inverse``, ``eigh_dtype`` and ``eigh_tolerance`` (the check threshold of the first ``eigh``
    attempt, see :func:`.eigen.checked_eigh`) apply to ``"eigh"`` only.

    The residual is, for ``"eigh"``, ``η + ω + ‖min(λ, 0)‖₂/‖λ‖₂``: the decomposition's relative backward
    error ``‖Q diag(λ) Qᵀ − S‖_F/‖S‖_F`` and loss of orthogonality ``‖QᵀQ − I‖_F`` (both about ``d·u`` or
    less for a sound one) plus the relative size of the clamped negative eigenvalues. Together they bound
    the relative distance from ``S`` to the PSD matrix ``Q diag(max(λ, 0)) Qᵀ`` whose root was taken: O(1)
    for a broken decomposition or materially indefinite input, which the clamp would otherwise silently
    change. With ``pseudo_inverse`` the same holds; the eigenvalues dropped below the threshold are
    intended, not counted. For ``"newton"`` it is ``max|M − I|`` at the returned iterate, i.e. how far
    ``H^p (S + εI)`` is from ``I``.

    Accuracy of ``eigh_dtype=torch.float32`` (unit roundoff ``u = 2⁻²⁴``) against the exact root ``X*`` of
    the same ``S``: with ``ε' `` the ridge, ``m = λ_min(S) + ε'`` (so ``‖X*‖₂ = m^(−1/p)``),
    ``δ = η‖S‖_F + ω‖S‖₂`` and ``lo = max(ε', m − δ)``, the computed root satisfies

        ``‖X − X*‖_F / ‖X*‖₂ ≤ (m/lo)^(1/p) · (δ/(p·lo) + ω) + O(d·u)``

    (``x^(−1/p)`` has divided differences at most ``|f'(lo)|`` above ``lo``; ``ω`` bounds the step from ``Q``
    to the nearest orthogonal matrix). For the ill-conditioned factors the ridge is for (``m ≈ ε·λ_max``,
    relative ε) this is about ``(η‖S‖_F/‖S‖₂ + ω)/(p·ε)``; the check guarantees ``η, ω ≤ 32·d·u``.
    Measured (η ≈ 10–30·u, ω ≈ d·u on CPU, d ≤ 1024): ``‖X − X*‖₂/‖X*‖₂ ≈ 5–30·u/(p·ε)``, i.e. 0.3/p–0.5/p
    at ``ε = 1e-6`` and 0.005/p–0.02/p at ``ε = 1e-4``. Float32 statistics accumulated over 1000 steps
    (β₂ = 0.999) already move the root by a seventh to a third of that (``benchmarks/roots_bench.py``,
    in-context table): the same order, not the same size. A float64 ``eigh`` is held to the same bound
    with ``u = 2⁻⁵³``. With ``pseudo_inverse`` the bound holds for spectra with no eigenvalue within ``δ``
    of the threshold (one that crosses it changes the root by O(1) in its direction, whatever the
    precision).

    Non-finite input never raises: its root is NaN, its residual ``+inf``, and it is not accepted; the
    other matrices of the batch are unaffected.
    """
    p = _validate(matrices, p, epsilon, method, max_residual, newton_tolerance, newton_max_iterations,
                  pseudo_inverse, eigh_dtype)
    if method == "eigh":
        safe, finite_input = symmetrized(matrices, eigh_dtype)
        root, residual, ok = _eigh_root(safe, p, epsilon, relative_epsilon, pseudo_inverse, eigh_tolerance)
    else:
        safe, finite_input = symmetrized(matrices, torch.float64)
        root, residual, ok = _coupled_newton_root(
            safe, p, epsilon, relative_epsilon, newton_tolerance, newton_max_iterations
        )
    ok = ok & finite_input
    root = torch.where(ok[:, None, None], root, torch.nan).to(matrices.dtype)
    # Finiteness is checked after the cast: a finite root can overflow a narrower dtype.
    valid = ok & root.isfinite().all(dim=(-2, -1))
    residual = torch.where(valid, residual.to(torch.float64), math.inf)
    accepted = valid & (residual <= max_residual)
    batch_shape = matrices.shape[:-2]
    return RootResult(
        root=root.reshape(matrices.shape),
        residual=residual.reshape(batch_shape),
        accepted=accepted.reshape(batch_shape),
    )


def max_eigenvalue(matrices: Tensor, *, iterations: int = 100, tolerance: float = 1e-9) -> Tensor:
    """``λ_max`` of symmetric PSD matrices ``(..., d, d)`` by batched power iteration, ``(...,)``.

    Returns ``‖A x_k‖`` for the unit iterate ``x_k``: a lower bound on ``λ_max`` whose error shrinks like
    ``(λ₂/λ₁)^(2k)``. Each matrix stops once its estimate changes by at most ``tolerance`` (relative), so
    its result does not depend on the rest of the batch; all stop after ``iterations`` steps. The start
    vector is a fixed Gaussian draw, so the result is deterministic and generically not orthogonal to
    the top eigenvector. A zero matrix gives 0.
    """
    d = matrices.shape[-1]
    start = torch.randn(d, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = start.to(matrices.device, matrices.dtype).expand(*matrices.shape[:-2], d, 1)
    x = x / torch.linalg.vector_norm(x, dim=-2, keepdim=True)
    estimate = torch.zeros(matrices.shape[:-2], dtype=matrices.dtype, device=matrices.device)
    active = torch.ones_like(estimate, dtype=torch.bool)
    for _ in range(iterations):
        y = matrices @ x
        norm = torch.linalg.vector_norm(y, dim=-2, keepdim=True)
        new_estimate = torch.where(active, norm[..., 0, 0], estimate)
        x = torch.where(active[..., None, None], y / norm.clamp_min(torch.finfo(matrices.dtype).tiny), x)
        active = active & ((new_estimate - estimate).abs() > tolerance * new_estimate)
        estimate = new_estimate
        if not bool(active.any()):
            break
    return estimate


def _validate(
    matrices: Tensor,
    p: float,
    epsilon: float,
    method: str,
    max_residual: float,
    newton_tolerance: float,
    newton_max_iterations: int,
    pseudo_inverse: bool,
    eigh_dtype: torch.dtype,
) -> float | int:
    """Raise on bad arguments; return ``p`` as used (an ``int`` for ``"newton"``)."""
    validate_matrices(matrices, "matrices")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    if isinstance(p, bool) or not isinstance(p, Real) or not math.isfinite(p) or p <= 0:
        raise ValueError(f"p must be a finite number > 0 (the root order, e.g. 2k for k dims); got {p!r}.")
    if method == "newton":
        if not float(p).is_integer():
            raise ValueError(
                f"method 'newton' needs an integer p (it multiplies by T^p); got p={p!r}. "
                "Use method='eigh' for a fractional root order."
            )
        if pseudo_inverse:
            raise ValueError("pseudo_inverse needs method='eigh': Newton never sees the eigenvalues to drop.")
        p = int(p)
    if not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(
            f"epsilon must be finite and >= 0; got {epsilon}. Use a small positive ridge such as 1e-6 "
            "(relative) or 1e-12 (absolute)."
        )
    if eigh_dtype not in EIGH_DTYPES:
        raise ValueError(f"eigh_dtype must be one of {EIGH_DTYPES}; got {eigh_dtype}.")
    if not max_residual >= 0:
        raise ValueError(f"max_residual must be >= 0; got {max_residual}.")
    if not newton_tolerance > 0:
        raise ValueError(f"newton_tolerance must be > 0; got {newton_tolerance}.")
    if isinstance(newton_max_iterations, bool) or not isinstance(newton_max_iterations, Integral):
        raise ValueError(f"newton_max_iterations must be an integer; got {newton_max_iterations!r}.")
    if newton_max_iterations < 1:
        raise ValueError(f"newton_max_iterations must be >= 1; got {newton_max_iterations}.")
    return p


def _ridge(largest: Tensor, epsilon: float, relative: bool) -> Tensor:
    """Per-matrix ridge ``(n,)``: ``ε·λ_max`` or ``ε``."""
    return epsilon * largest if relative else torch.full_like(largest, epsilon)


def _eigh_root(
    matrices: Tensor, p: float, epsilon: float, relative: bool, pseudo_inverse: bool, tolerance: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Root, residual and decomposition-passed mask for finite symmetric ``(n, d, d)`` (compute dtype)."""
    decomposition = checked_eigh(matrices, dtype=matrices.dtype, tolerance=tolerance)
    eigenvalues, vectors = decomposition.values, decomposition.vectors
    clamped = eigenvalues.clamp_min(0.0)
    ridge = _ridge(clamped.amax(dim=-1), epsilon, relative)
    if pseudo_inverse:
        kept = clamped > ridge[:, None]
        inverted = torch.where(kept, clamped, 1.0).pow(-1.0 / p) * kept
    else:
        inverted = (clamped + ridge[:, None]).pow(-1.0 / p)
    root = (vectors * inverted[:, None, :]) @ vectors.mT
    # In float64: squares of float32 eigenvalues can leave its range.
    wide = eigenvalues.to(torch.float64)
    norm = torch.linalg.vector_norm(wide, dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    clamp = torch.linalg.vector_norm(wide.clamp_max(0.0), dim=-1) / norm
    residual = decomposition.backward_error.double() + decomposition.orthogonality.double() + clamp
    return root, residual, decomposition.ok


def _coupled_newton_root(
    matrices: Tensor, p: int, epsilon: float, relative: bool, tolerance: float, max_iterations: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Coupled Newton ``(S + εI)^(−1/p)`` for finite fp64 ``(n, d, d)``: root ``H``, ``max|M − I|``, ok.

    All matrices iterate together; each one is frozen once ``max|M − I| <= tolerance`` or once an
    iteration fails to lower it (the previous ``H`` is kept). Only the unfrozen ones are computed.
    The growth check starts at the second iteration: the first maps the eigenvalues of ``M`` from
    ``(0, (p+1)/2]`` into ``(0, 1]`` and may legitimately raise ``max|M − I|``; from then on ``I − M`` is
    PSD, its largest entry is on the diagonal, and that diagonal shrinks monotonically in exact
    arithmetic, so growth means roundoff has taken over (or the input was not PSD).
    """
    n, d = matrices.shape[0], matrices.shape[-1]
    identity = torch.eye(d, dtype=matrices.dtype, device=matrices.device)
    largest = max_eigenvalue(matrices) if relative else matrices.new_zeros(n)
    regularized = matrices + _ridge(largest, epsilon, relative)[:, None, None] * identity
    norm = torch.linalg.matrix_norm(regularized)
    # A zero regularized matrix (zero input, zero ridge) has no root; it is iterated as I and dropped.
    ok = norm > 0
    z = (1 + p) / (2 * torch.where(ok, norm, 1.0))
    m = z[:, None, None] * regularized
    h = z.pow(1.0 / p)[:, None, None] * identity.expand(n, d, d)
    error = _max_abs_deviation(m, identity)
    active = ok & (error > tolerance)
    for iteration in range(max_iterations):
        index = active.nonzero().squeeze(-1)
        if index.numel() == 0:
            break
        t = ((p + 1) / p) * identity - m[index] / p
        new_m = torch.linalg.matrix_power(t, p) @ m[index]
        new_h = h[index] @ t
        new_error = _max_abs_deviation(new_m, identity)
        # NaN errors compare False, so a blown-up iterate is dropped too.
        improved = new_error < error[index] if iteration > 0 else new_error.isfinite()
        taken = index[improved]
        m[taken], h[taken], error[taken] = new_m[improved], new_h[improved], new_error[improved]
        active[index] = improved & (new_error > tolerance)
    return h, error, ok


def _max_abs_deviation(m: Tensor, identity: Tensor) -> Tensor:
    return (m - identity).abs().amax(dim=(-2, -1))
