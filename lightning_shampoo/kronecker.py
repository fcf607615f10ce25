"""Kronecker-factored statistics and preconditioning, batched over a stack of same-shaped blocks.

A stack ``X`` has shape ``(n, d_1, …, d_k)``. Its mode-i unfolding ``X₍ᵢ₎`` moves dim i to the front
and flattens the rest, ``(n, d_i, ∏_{j≠i} d_j)``; the mode-i product ``X ×ᵢ P`` is the tensor whose
mode-i unfolding is ``P X₍ᵢ₎``. For a 2-D block these are the familiar ``L = G Gᵀ``, ``R = Gᵀ G`` and
``P_L X P_R``. Dims whose factor is ``None`` are left alone (identity).

Factors and roots may be stored as float32 or bfloat16 upper triangles (:mod:`.triangles`), and factors in
bfloat16: the statistics are then accumulated in float32 and written back with stochastic rounding, which
keeps the EMA unbiased (rounding to nearest would freeze it: with β2 = 0.999 an update is smaller than half
a bfloat16 ulp). Mode products run in the dtype asked for (default: that of the matrices they multiply by;
bfloat16 ones run on bfloat16 tensor cores / AMX units).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from . import triangles


def mode_unfold(stack: Tensor, dim: int) -> Tensor:
    """``X₍ᵢ₎`` for every block: ``(n, d_i, rest)``, its columns in a fixed order (the Gram matrix
    ``X₍ᵢ₎X₍ᵢ₎ᵀ`` does not depend on it). A view for the first and the last dim of a contiguous stack."""
    if dim == stack.dim() - 2:
        return stack.reshape(stack.shape[0], -1, stack.shape[-1]).mT
    moved = stack.movedim(dim + 1, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


def update_statistics(
    factors: Sequence[Tensor | None],
    grad_stack: Tensor,
    beta2: float,
    generator: torch.Generator | None = None,
) -> None:
    """In place, for every dim i with a factor: ``S_i ← β2·S_i + (1−β2)·G₍ᵢ₎G₍ᵢ₎ᵀ``.

    ``beta2 == 1`` is the plain running sum ``S_i ← S_i + G₍ᵢ₎G₍ᵢ₎ᵀ`` (AdaGrad-style). A float32 factor
    takes one fused ``baddbmm_`` (no temporaries), a packed one (:mod:`.triangles`) the triangle of the
    Gram matrix; a bfloat16 one is updated in float32 and rounded back stochastically with
    ``generator``'s bits (deterministic for a seeded generator).
    """
    alpha = 1.0 if beta2 == 1.0 else 1.0 - beta2
    for dim, factor in enumerate(factors):
        if factor is None:
            continue
        unfolded = mode_unfold(grad_stack, dim)
        if triangles.is_packed(factor):
            gram = triangles.pack(torch.bmm(unfolded, unfolded.mT))
            if beta2 == 1.0:
                factor.add_(gram)
            else:
                factor.lerp_(gram, alpha)
        elif factor.dtype == unfolded.dtype:
            factor.baddbmm_(unfolded, unfolded.mT, beta=beta2, alpha=alpha)
        else:
            updated = torch.baddbmm(factor.to(unfolded.dtype), unfolded, unfolded.mT, beta=beta2, alpha=alpha)
            symmetric = torch.add(updated, updated.mT).mul_(0.5)
            round_stochastically(symmetric, generator, symmetric=True, out=factor)


def rounding_generator(
    dtype: torch.dtype, step: int, index: int, device: torch.device
) -> torch.Generator | None:
    """The random bits of the stochastic rounding of ``dtype`` factors (``None`` for float32): seeded by the
    step and the parameter's index, so runs, resumed runs and any number of ranks round alike."""
    if dtype == torch.float32:
        return None
    return torch.Generator(device).manual_seed(step * 1_000_003 + index)


def round_stochastically(
    values: Tensor, generator: torch.Generator | None, symmetric: bool = False, out: Tensor | None = None
) -> Tensor:
    """float32 → bfloat16, rounding up with probability equal to the distance to the lower neighbour:
    unbiased in expectation. Adds 16 random bits below bfloat16's mantissa and truncates them; with
    ``symmetric`` (a stack of symmetric matrices) entries ``(i, j)`` and ``(j, i)`` share their bits, so the
    result stays exactly symmetric. Written into ``out`` (a bfloat16 tensor) if given."""
    bits = values.contiguous().view(torch.int32)
    shape, device = values.shape, values.device
    noise = torch.randint(0, 1 << 16, shape, generator=generator, dtype=torch.int32, device=device)
    if symmetric:  # the upper triangle's bits, mirrored
        noise = torch.where(_upper(shape[-1], device), noise, noise.mT)
    # Exactly a bfloat16 value once the low 16 bits are cleared: the conversion below does not round.
    truncated = noise.add_(bits).bitwise_and_(-(1 << 16)).view(torch.float32)
    return truncated.to(torch.bfloat16) if out is None else out.copy_(truncated)


@functools.cache
def _upper(side: int, device: torch.device) -> Tensor:
    """``(side, side)`` bool mask of the entries on and above the diagonal."""
    return torch.ones(side, side, dtype=torch.bool, device=device).triu()


def precondition(stack: Tensor, roots: Sequence[Tensor | None], dtype: torch.dtype | None = None) -> Tensor:
    """``X ×₁ P₁ ⋯ ×ₖ Pₖ`` for every block, one ``bmm`` per factor, computed in ``dtype`` (default: the
    matrices' own) and returned in the stack's. Symmetric ``Pᵢ`` may come packed (:mod:`.triangles`).

    The last mode multiplies from the right, ``X Pₖᵀ`` on the trailing dim, the others from the left,
    ``Pᵢ X₍ᵢ₎`` with dim i moved to the front: for the 2-D blocks of matrices that is ``P₁ X P₂ᵀ`` with
    no copies and a contiguous result.
    """
    n, last = stack.shape[0], stack.dim() - 2
    dtype = dtype or next((root.dtype for root in roots if root is not None), stack.dtype)
    out = stack.to(dtype)
    for dim, root in enumerate(roots):
        if root is None:
            continue
        root = triangles.full(root.to(dtype))
        if dim == last:
            shape = out.shape
            out = torch.bmm(out.reshape(n, -1, shape[-1]), root.mT).reshape(shape)
        else:
            moved = out.movedim(dim + 1, 1)
            product = torch.bmm(root, moved.reshape(n, moved.shape[1], -1))
            out = product.reshape(moved.shape).movedim(1, dim + 1)
    return out.to(stack.dtype)
