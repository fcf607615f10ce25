"""Stacks of symmetric matrices stored as their upper triangles.

A stack ``(n, d, d)`` of symmetric matrices is kept as ``(n, d(d+1)/2)``: row by row, the entries on and
above the diagonal. A float32 triangle takes the bytes of a full bfloat16 matrix and keeps every bit of a
float32 one, which is what compact storage needs for Shampoo's factors: bfloat16 rounding of a factor's
entries (up to 0.4% of each) is noise far above its small eigenvalues, which its inverse root amplifies
most. Packing and unpacking are one gather each.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


def size(side: int) -> int:
    """Entries of the triangle of a ``side × side`` matrix."""
    return side * (side + 1) // 2


def side_of(entries: int) -> int:
    """The side ``d`` of a triangle with ``entries = d(d+1)/2`` (a ValueError for other counts)."""
    side = (math.isqrt(8 * entries + 1) - 1) // 2
    if size(side) != entries:
        raise ValueError(f"{entries} entries are not the upper triangle of a square matrix")
    return side


def is_packed(stack: Tensor) -> bool:
    """Whether ``stack`` is a stack of triangles ``(n, t)`` rather than of matrices ``(n, d, d)``."""
    return stack.dim() == 2


def pack(stack: Tensor) -> Tensor:
    """``(n, d, d)`` → ``(n, d(d+1)/2)``: the upper triangles (the lower ones are assumed equal)."""
    side = stack.shape[-1]
    return stack.reshape(stack.shape[0], side * side).index_select(1, _upper_entries(side, stack.device))


def unpack(packed: Tensor) -> Tensor:
    """``(n, d(d+1)/2)`` → the symmetric ``(n, d, d)``."""
    side = side_of(packed.shape[-1])
    return packed.index_select(1, _triangle_positions(side, packed.device)).view(packed.shape[0], side, side)


def full(stack: Tensor) -> Tensor:
    """The matrices of a stack in either form."""
    return unpack(stack) if is_packed(stack) else stack


@functools.cache
def _upper_entries(side: int, device: torch.device) -> Tensor:
    """Flat indices ``i·d + j`` of the entries with ``i ≤ j``, row by row."""
    rows, cols = torch.triu_indices(side, side, device=device)
    return rows * side + cols


@functools.cache
def _triangle_positions(side: int, device: torch.device) -> Tensor:
    """For every flat entry ``(i, j)`` of a matrix, the triangle position of ``(min, max)``."""
    rows, cols = torch.triu_indices(side, side)
    positions = torch.empty(side, side, dtype=torch.long)
    positions[rows, cols] = torch.arange(rows.numel())
    positions[cols, rows] = torch.arange(rows.numel())
    return positions.flatten().to(device)
