"""Inverse p-th roots ``(S + εI)^(−1/p)`` of batched symmetric PSD matrices, and their acceptance check.

All arithmetic is float64 whatever the input dtype; the root is cast back to the input dtype at the end.
The ridge is ``ε`` or, with ``relative_epsilon``, ``ε·λ_max(S)`` per matrix, which caps the condition
number of ``S + εI`` at about ``1/ε``. The input is never modified (adding the ridge to stored
statistics in place would accumulate it forever).

Two methods, both batched over all leading dims (no per-matrix Python loop):

- ``"eigh"``: ``S = Q diag(λ) Qᵀ``; ``root = Q diag((max(λ, 0) + ε)^(−1/p)) Qᵀ``. Negative eigenvalues
  are roundoff on PSD input and are clamped to 0.
- ``"newton"``: the coupled Newton iteration of Guo & Higham (2006) on ``A = S + εI``:
  ``z = (1+p)/(2‖A‖_F)``, ``M₀ = zA``, ``H₀ = z^(1/p) I``; repeat ``T = ((p+1)/p) I − M/p``,
  ``M ← T^p M``, ``H ← H T``. The invariant ``M = H^p A`` makes ``H → A^(−1/p)`` as ``M → I``.

A result is accepted when its root is finite and its residual is at most ``max_residual``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor

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
    p: int,
    *,
    epsilon: float,
    relative_epsilon: bool,
    method: str = "eigh",
    max_residual: float = 0.1,
    newton_tolerance: float = 1e-6,
    newton_max_iterations: int = 100,
) -> RootResult:
    """``(S + εI)^(−1/p)`` for every symmetric PSD ``S`` in ``matrices`` ``(..., d, d)``, in float64.

    ``ε = epsilon`` or, with ``relative_epsilon``, ``epsilon·λ_max(S)`` per matrix (exact from the
    eigendecomposition for ``"eigh"``, by power iteration for ``"newton"``).

    The residual is, for ``"eigh"``, the relative reconstruction error of the decomposition,
    ``max|Q diag(max(λ,0) + ε) Qᵀ − (S + εI)| / max|S + εI|``: ~1e-15 for a sound decomposition, O(1) for
    a broken one or for materially indefinite input (which the clamp would silently change). For
    ``"newton"`` it is ``max|M − I|`` at the returned iterate, i.e. how far ``H^p (S + εI)`` is from ``I``.

    Non-finite input never raises: its root is NaN, its residual ``+inf``, and it is not accepted; the
    other matrices of the batch are unaffected.
    """
    _validate(matrices, p, epsilon, method, max_residual, newton_tolerance, newton_max_iterations)
    d = matrices.shape[-1]
    flat = matrices.reshape(-1, d, d).to(torch.float64)
    # Symmetrise so both methods see the same matrix (eigh reads one triangle, Newton all of it);
    # this also makes a fresh tensor, so nothing below can touch the caller's storage.
    sym = 0.5 * (flat + flat.mT)
    identity = torch.eye(d, dtype=torch.float64, device=sym.device)
    finite_input = sym.isfinite().all(dim=(-2, -1))
    # Non-finite matrices are swapped for I so one of them cannot break the batched decomposition.
    safe = torch.where(finite_input[:, None, None], sym, identity)

    if method == "eigh":
        root, residual, ok = _eigh_root(safe, p, epsilon, relative_epsilon)
    else:
        root, residual, ok = _coupled_newton_root(
            safe, p, epsilon, relative_epsilon, newton_tolerance, newton_max_iterations
        )
    ok = ok & finite_input
    root = torch.where(ok[:, None, None], root, torch.nan).to(matrices.dtype)
    # Finiteness is checked after the cast: a finite fp64 root can overflow a narrower dtype.
    valid = ok & root.isfinite().all(dim=(-2, -1))
    residual = torch.where(valid, residual, math.inf)
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
    p: int,
    epsilon: float,
    method: str,
    max_residual: float,
    newton_tolerance: float,
    newton_max_iterations: int,
) -> None:
    if matrices.ndim < 2 or matrices.shape[-1] != matrices.shape[-2]:
        raise ValueError(
            f"matrices must be square with shape (..., d, d); got {tuple(matrices.shape)}. "
            "Pass a stack of symmetric matrices."
        )
    if not matrices.is_floating_point():
        raise ValueError(f"matrices must have a floating dtype; got {matrices.dtype}. Cast them first.")
    if isinstance(p, bool) or not isinstance(p, Integral) or p < 1:
        raise ValueError(f"p must be an integer >= 1 (the root order; 2k for an order-k tensor); got {p!r}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    if not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(
            f"epsilon must be finite and >= 0; got {epsilon}. Use a small positive ridge such as 1e-6 "
            "(relative) or 1e-12 (absolute)."
        )
    if not max_residual >= 0:
        raise ValueError(f"max_residual must be >= 0; got {max_residual}.")
    if not newton_tolerance > 0:
        raise ValueError(f"newton_tolerance must be > 0; got {newton_tolerance}.")
    if isinstance(newton_max_iterations, bool) or not isinstance(newton_max_iterations, Integral):
        raise ValueError(f"newton_max_iterations must be an integer; got {newton_max_iterations!r}.")
    if newton_max_iterations < 1:
        raise ValueError(f"newton_max_iterations must be >= 1; got {newton_max_iterations}.")


def _ridge(largest: Tensor, epsilon: float, relative: bool) -> Tensor:
    """Per-matrix ridge ``(n,)``: ``ε·λ_max`` or ``ε``."""
    return epsilon * largest if relative else torch.full_like(largest, epsilon)


def _eigh_root(matrices: Tensor, p: int, epsilon: float, relative: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Root, reconstruction residual and decomposition-succeeded mask for finite fp64 ``(n, d, d)``."""
    eigenvalues, vectors, ok = _eigh_with_fallback(matrices)
    eigenvalues = eigenvalues.clamp_min(0.0)
    ridge = _ridge(eigenvalues.amax(dim=-1), epsilon, relative)
    shifted = eigenvalues + ridge[:, None]
    root = (vectors * shifted.pow(-1.0 / p)[:, None, :]) @ vectors.mT
    identity = torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device)
    regularized = matrices + ridge[:, None, None] * identity
    reconstruction = (vectors * shifted[:, None, :]) @ vectors.mT
    # The scale is 0 only for a zero matrix with zero ridge, whose root is infinite anyway.
    scale = regularized.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(matrices.dtype).tiny)
    residual = (reconstruction - regularized).abs().amax(dim=(-2, -1)) / scale
    return root, residual, ok


def _eigh_with_fallback(matrices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batched ``eigh``; if it fails, retry matrix by matrix so one bad matrix fails alone.

    Failed matrices get eigenvalues 0 and ``Q = I`` as placeholders and ``ok = False``.
    """
    n, d = matrices.shape[0], matrices.shape[-1]
    try:
        eigenvalues, vectors = torch.linalg.eigh(matrices)
        return eigenvalues, vectors, torch.ones(n, dtype=torch.bool, device=matrices.device)
    except torch.linalg.LinAlgError:
        pass
    eigenvalues = matrices.new_zeros(n, d)
    vectors = torch.eye(d, dtype=matrices.dtype, device=matrices.device).repeat(n, 1, 1)
    ok = torch.zeros(n, dtype=torch.bool, device=matrices.device)
    for i in range(n):
        try:
            eigenvalues[i], vectors[i] = torch.linalg.eigh(matrices[i])
            ok[i] = True
        except torch.linalg.LinAlgError:
            continue
    return eigenvalues, vectors, ok


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
