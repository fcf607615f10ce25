"""Parameter shapes → blocks.

A parameter is viewed as a *merged* tensor (size-1 dims squeezed, adjacent small dims merged while the
product stays ≤ ``block_size``), whose dims larger than ``block_size`` are cut into chunks. The blocks
are the cells of that grid. Cells of the same shape form a :class:`BlockGroup`, stored stacked as one
``(n_blocks, *block_shape)`` tensor so the per-step work is batched.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockGroup:
    """A regular grid of same-shaped blocks inside the merged tensor.

    Along merged dim ``j`` the group covers ``counts[j]`` consecutive blocks of size ``block_shape[j]``
    starting at ``starts[j]``.
    """

    starts: tuple[int, ...]
    counts: tuple[int, ...]
    block_shape: tuple[int, ...]
    preconditioned: tuple[bool, ...]

    @property
    def n_blocks(self) -> int:
        return math.prod(self.counts)

    @property
    def order(self) -> int:
        """Number of preconditioned dims: the block's Kronecker order k."""
        return sum(self.preconditioned)


@dataclass(frozen=True)
class BlockPlan:
    """How one parameter is cut into blocks; ``groups`` is empty when nothing is preconditioned."""

    param_shape: tuple[int, ...]
    merged_shape: tuple[int, ...]
    groups: tuple[BlockGroup, ...]

    @property
    def preconditioned(self) -> bool:
        return bool(self.groups)

    @cached_property  # asked for every tensor split or merged, every step
    def single_block(self) -> bool:
        """The whole (merged) tensor is one block: splitting and merging are reshapes."""
        return len(self.groups) == 1 and self.groups[0].n_blocks == 1

    def split(self, tensor: Tensor) -> list[Tensor]:
        """Cut a parameter-shaped tensor into one stacked ``(n, *block_shape)`` tensor per group.

        A group that is the whole tensor comes back as a view; other groups are copies.
        """
        if self.single_block:  # the common case: a view
            return [tensor.reshape(1, *self.groups[0].block_shape)]
        merged = tensor.reshape(self.merged_shape)
        return [_gather_group(merged, group) for group in self.groups]

    def merge(self, blocks: list[Tensor]) -> Tensor:
        """Inverse of :meth:`split`: reassemble per-group stacks into a parameter-shaped tensor."""
        if self.single_block:
            return blocks[0].reshape(self.param_shape)
        out = blocks[0].new_empty(self.merged_shape)
        for group, stacked in zip(self.groups, blocks, strict=True):
            _scatter_group(out, group, stacked)
        return out.reshape(self.param_shape)


def merge_small_dims(
    shape: tuple[int, ...], block_size: int, max_factor_ratio: float | None = None
) -> tuple[int, ...]:
    """Squeeze size-1 dims, then merge adjacent dims left to right while the product stays ≤ block_size
    (and, with ``max_factor_ratio`` r, while the merged dim ``m`` keeps ``m² ≤ r·numel``: merging a
    ``10×64`` weight into one 640-wide dim would give it a factor 640 times its own size)."""
    numel = math.prod(shape)
    merged: list[int] = []
    for size in (s for s in shape if s != 1):
        product = merged[-1] * size if merged else 0
        if (
            merged
            and product <= block_size
            and (max_factor_ratio is None or product**2 <= max_factor_ratio * numel)
        ):
            merged[-1] = product
        else:
            merged.append(size)
    return tuple(merged)


def plan_blocks(
    shape: tuple[int, ...] | torch.Size,
    block_size: int,
    max_preconditioned_dim: int | None = None,
    precondition_1d: bool = True,
    max_factor_ratio: float | None = None,
) -> BlockPlan:
    """Plan the blocks of a parameter of ``shape``.

    Dims larger than ``max_preconditioned_dim`` keep an identity factor and are not split; every other
    dim larger than ``block_size`` is split into chunks of ``block_size`` (remainder last). An order-1
    parameter is preconditioned only when ``precondition_1d``. With ``max_factor_ratio`` r, a dim of size
    ``d`` in blocks of ``n`` entries gets a factor only if ``d² ≤ r·n``: no factor is ever far larger than
    the block it serves (a bias or a vector of size d would need a d×d one; a vocabulary dim dwarfs its
    block), and small dims are merged only under the same bound.
    """
    shape = tuple(shape)
    merged = merge_small_dims(shape, block_size, max_factor_ratio)
    if math.prod(shape) == 0:
        return BlockPlan(shape, merged, ())
    preconditioned = tuple(max_preconditioned_dim is None or s <= max_preconditioned_dim for s in merged)
    if max_factor_ratio is not None:
        # Judged on a full-size block (the remainder blocks follow it, so every group shares one pattern).
        chunk = [min(s, block_size) if keep else s for s, keep in zip(merged, preconditioned, strict=True)]
        block = math.prod(chunk)
        preconditioned = tuple(
            keep and c * c <= max_factor_ratio * block for c, keep in zip(chunk, preconditioned, strict=True)
        )
    if not any(preconditioned) or (len(merged) == 1 and not precondition_1d):
        return BlockPlan(shape, merged, ())
    # Per merged dim, the runs of equal-sized chunks: (start, count, size).
    runs = [
        _chunk_runs(size, block_size) if keep else [(0, 1, size)]
        for size, keep in zip(merged, preconditioned, strict=True)
    ]
    groups = tuple(
        BlockGroup(
            starts=tuple(r[0] for r in combo),
            counts=tuple(r[1] for r in combo),
            block_shape=tuple(r[2] for r in combo),
            preconditioned=preconditioned,
        )
        for combo in itertools.product(*runs)
    )
    return BlockPlan(shape, merged, groups)


def plan_for_group(shape: tuple[int, ...], group: dict[str, Any]) -> BlockPlan:
    """:func:`plan_blocks` under an optimizer parameter group's blocking options."""
    return plan_blocks(
        shape, group["block_size"], group["max_preconditioned_dim"], group["precondition_1d"],
        group["max_factor_ratio"],
    )  # fmt: skip


def _chunk_runs(size: int, block_size: int) -> list[tuple[int, int, int]]:
    full, rest = divmod(size, block_size)
    runs = [(0, full, block_size)] if full else []
    if rest:
        runs.append((full * block_size, 1, rest))
    return runs


def _unflatten_all(region: Tensor, group: BlockGroup) -> Tensor:
    for dim in reversed(range(region.dim())):
        region = region.unflatten(dim, (group.counts[dim], group.block_shape[dim]))
    return region


def _grid_permutation(order: int) -> list[int]:
    # (c0, s0, c1, s1, ...) -> (c0, c1, ..., s0, s1, ...)
    return [2 * j for j in range(order)] + [2 * j + 1 for j in range(order)]


def _gather_group(merged: Tensor, group: BlockGroup) -> Tensor:
    grid = _unflatten_all(_narrow(merged, group), group)
    return grid.permute(_grid_permutation(len(group.counts))).reshape(group.n_blocks, *group.block_shape)


def _scatter_group(out: Tensor, group: BlockGroup, stacked: Tensor) -> None:
    grid = _unflatten_all(_narrow(out, group), group).permute(_grid_permutation(len(group.counts)))
    grid.copy_(stacked.reshape(grid.shape))


def _narrow(merged: Tensor, group: BlockGroup) -> Tensor:
    region = merged
    for dim, (start, count, size) in enumerate(
        zip(group.starts, group.counts, group.block_shape, strict=True)
    ):
        region = region.narrow(dim, start, count * size)
    return region
