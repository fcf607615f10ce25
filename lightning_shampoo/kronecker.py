"""Kronecker-factored statistics and preconditioning, batched over a stack of same-shaped blocks.

A stack ``X`` has shape ``(n, d_1, …, d_k)``. Its mode-i unfolding ``X₍ᵢ₎`` moves dim i to the front
and flattens the rest, ``(n, d_i, ∏_{j≠i} d_j)``; the mode-i product ``X ×ᵢ P`` is the tensor whose
mode-i unfolding is ``P X₍ᵢ₎``. For a 2-D block these are the familiar ``L = G Gᵀ``, ``R = Gᵀ G`` and
``P_L X P_R``. Dims whose factor is ``None`` are left alone (identity).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def mode_unfold(stack: Tensor, dim: int) -> Tensor:
    """``X₍ᵢ₎`` for every block: ``(n, d_i, rest)``, its columns in a fixed order (the Gram matrix
    ``X₍ᵢ₎X₍ᵢ₎ᵀ`` does not depend on it). A view for the first and the last dim of a contiguous stack."""
    if dim == stack.dim() - 2:
        return stack.reshape(stack.shape[0], -1, stack.shape[-1]).mT
    moved = stack.movedim(dim + 1, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


def update_statistics(factors: Sequence[Tensor | None], grad_stack: Tensor, beta2: float) -> None:
    """In place, for every dim i with a factor: ``S_i ← β2·S_i + (1−β2)·G₍ᵢ₎G₍ᵢ₎ᵀ``.

    ``beta2 == 1`` is the plain running sum ``S_i ← S_i + G₍ᵢ₎G₍ᵢ₎ᵀ`` (AdaGrad-style).
    One fused ``baddbmm_`` per factor: no temporaries.
    """
    alpha = 1.0 if beta2 == 1.0 else 1.0 - beta2
    for dim, factor in enumerate(factors):
        if factor is not None:
            unfolded = mode_unfold(grad_stack, dim)
            factor.baddbmm_(unfolded, unfolded.mT, beta=beta2, alpha=alpha)


def precondition(stack: Tensor, roots: Sequence[Tensor | None]) -> Tensor:
    """``X ×₁ P₁ ⋯ ×ₖ Pₖ`` for every block, one ``bmm`` per factor.

    The last mode multiplies from the right, ``X Pₖᵀ`` on the trailing dim, the others from the left,
    ``Pᵢ X₍ᵢ₎`` with dim i moved to the front: for the 2-D blocks of matrices that is ``P₁ X P₂ᵀ`` with
    no copies and a contiguous result.
    """
    n, last = stack.shape[0], stack.dim() - 2
    out = stack
    for dim, root in enumerate(roots):
        if root is None:
            continue
        if dim == last:
            shape = out.shape
            out = torch.bmm(out.reshape(n, -1, shape[-1]), root.mT).reshape(shape)
        else:
            moved = out.movedim(dim + 1, 1)
            product = torch.bmm(root, moved.reshape(n, moved.shape[1], -1))
            out = product.reshape(moved.shape).movedim(1, dim + 1)
    return out
