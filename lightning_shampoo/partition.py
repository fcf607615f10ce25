"""Ownership across data-parallel ranks: which rank computes which parameter, or which blocks of it.

A parameter's work is the sum of its blocks' (:mod:`.cost`); every rank computes the same assignment from
the same costs, without communicating (:func:`assign`):

1. parameters within their fair share of the total (total / ranks) are owned whole, placed by the
   longest-processing-time greedy (:func:`assign_owners`: costliest first, to the least loaded rank);
2. a larger parameter cannot be balanced whole (an embedding, an LM head): its blocks, in block order, are
   cut into contiguous ranges that fill the ranks up to a common level (water filling), so the most loaded
   rank exceeds the ideal by about one block. A parameter is split only when its work reaches
   :data:`SPLIT_MIN_FLOPS`: below that the per-step copies of a split cost about what they save.

A rank's part of a split parameter is a list of segments, each a contiguous range of one block group's
stack (:data:`Segment`). The rank computes on the part as one flat tensor holding the segments' blocks one
after another (:class:`PartPlan`): its gradient's and weight's blocks are copied in, its moments are kept
for those blocks only (an elementwise moment kept whole by every part's rank would cost the full
parameter's memory on each of them, and its rotated coordinates are per block anyway). Locally segment
``l``'s factor stacks are ``{prefix}{l}_{i}``; the complete state names them by block group,
``{prefix}{g}_{i}``, every group's segments stacked in block order and the moments in the parameter's
shape: :meth:`Split.join_states` and :meth:`Split.cut_state` convert, so a checkpoint is the one-process
state whatever the number of ranks. A split parameter switches to its preconditioner part by part (each
at its first accepted result): unlike one process, a part whose every result of a refresh is rejected
keeps its diagonal update while another part's are accepted.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .blocking import BlockGroup, BlockPlan
from .cost import Work

# A parameter is split across ranks only if its work per step is at least this. A split costs every rank
# holding a part ~0.2 ms a step, whatever the size (copying the part of the weight and the gradient in,
# assembling the parameter after the all-gather; measured on one core, 96×64 to 512×256 parameters),
# while 1e7 flops are ~0.8 ms of one core (12 Gflop/s in the step's batched products): below this, halving
# a parameter's work on 2 ranks saves about what the split costs.
SPLIT_MIN_FLOPS = 1e7

Segment = tuple[int, int, int]
"""Blocks ``[start, stop)`` of block group ``g`` of a parameter's plan: ``(g, start, stop)``."""
Range = tuple[int, int, int]
"""Blocks ``[first, end)`` of a parameter, in block order over all its groups, owned by ``rank``:
``(rank, first, end)``."""


def assign_owners(
    costs: Sequence[float], world_size: int, loads: Sequence[float] | None = None
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Owner rank of every item and the ranks' loads: longest-processing-time greedy (costliest first, to
    the least loaded rank), starting from ``loads``.

    Deterministic (ties go to the lower index and the lower rank), so every rank computes the same
    assignment; the most loaded rank exceeds the optimum by at most the costliest item.
    """
    current = list(loads) if loads is not None else [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (current[r], r))
        owners[index] = rank
        current[rank] += costs[index]
    return tuple(owners), tuple(current)


def assign(
    work: Sequence[Work], world_size: int, loads: Sequence[float] | None = None
) -> tuple[tuple[tuple[Range, ...], ...], tuple[float, ...]]:
    """Every parameter's ranges of blocks by rank (one range ``(owner, 0, n_blocks)`` where it is owned
    whole) and the ranks' loads, starting from ``loads`` (see the module docstring)."""
    start = list(loads) if loads is not None else [0.0] * world_size
    fair = (sum(start) + sum(w.total for w in work)) / world_size
    large = {
        i for i, w in enumerate(work) if w.total > fair and w.total >= SPLIT_MIN_FLOPS and len(w.blocks) > 1
    }
    whole = [i for i in range(len(work)) if i not in large]
    owners, placed = assign_owners([work[i].total for i in whole], world_size, start)
    ranges: list[list[Range]] = [[] for _ in work]
    for i, owner in zip(whole, owners, strict=True):
        ranges[i].append((owner, 0, len(work[i].blocks)))
    current = list(placed)
    blocks = [(i, b, cost) for i in sorted(large) for b, cost in enumerate(work[i].blocks)]
    cuts = _fill(current, [cost for _, _, cost in blocks])
    for rank, (first, end) in enumerate(itertools.pairwise(cuts)):
        for i, b, cost in blocks[first:end]:
            current[rank] += cost
            if ranges[i] and ranges[i][-1][0] == rank:  # the next block of this rank's range
                ranges[i][-1] = (rank, ranges[i][-1][1], b + 1)
            else:
                ranges[i].append((rank, b, b + 1))
    return tuple(tuple(r) for r in ranges), tuple(current)


def _fill(loads: Sequence[float], costs: Sequence[float]) -> list[int]:
    """Cut points ``c_0 = 0 ≤ … ≤ c_W = len(costs)``: rank r takes items ``[c_r, c_{r+1})``, so that every
    rank reaches about the common level λ with ``Σ_r max(0, λ − load_r) = Σ costs`` (water filling); each
    cut is the item boundary nearest its target."""
    ordered, total = sorted(loads), sum(costs)
    # λ filling the k least loaded ranks, for the first k that leaves the others at or above it.
    for k in range(1, len(ordered) + 1):
        level = (total + sum(ordered[:k])) / k
        if k == len(ordered) or level <= ordered[k]:
            break
    boundaries = [0.0, *itertools.accumulate(costs)]
    cuts, target, item = [0], 0.0, 0
    for load in loads:
        target += max(0.0, level - load)
        # Move to the nearest boundary: past every midpoint below the target.
        while item < len(costs) and boundaries[item] + boundaries[item + 1] < 2 * target:
            item += 1
        cuts.append(item)
    cuts[-1] = len(costs)
    return cuts


def segments(plan: BlockPlan, first: int, end: int) -> list[Segment]:
    """Blocks ``[first, end)`` of ``plan`` (in block order over its groups) as segments of its groups."""
    out, offset = [], 0
    for g, group in enumerate(plan.groups):
        start, stop = max(first, offset), min(end, offset + group.n_blocks)
        if start < stop:
            out.append((g, start - offset, stop - offset))
        offset += group.n_blocks
    return out


@dataclass(frozen=True)
class PartPlan(BlockPlan):
    """The blocks a rank owns of a split parameter, as a flat tensor: the blocks of ``segments[l]`` of the
    ``whole`` plan one after another, in order. Group ``l`` is that segment's stack; only its ``n_blocks``,
    ``block_shape`` and ``preconditioned`` are read (its blocks are not a grid of the part)."""

    whole: BlockPlan | None = None
    segments: tuple[Segment, ...] = ()

    @classmethod
    def of(cls, whole: BlockPlan, parts: Sequence[Segment]) -> PartPlan:
        groups = []
        for g, start, stop in parts:
            shape = whole.groups[g].block_shape
            counts = (stop - start,) + (1,) * (len(shape) - 1)
            groups.append(BlockGroup((0,) * len(shape), counts, shape, whole.groups[g].preconditioned))
        numel = sum(group.n_blocks * math.prod(group.block_shape) for group in groups)
        return cls((numel,), (numel,), tuple(groups), whole=whole, segments=tuple(parts))

    def split(self, tensor: Tensor) -> list[Tensor]:
        """Views of the flat part, one ``(n, *block_shape)`` stack per segment."""
        sizes = [group.n_blocks * math.prod(group.block_shape) for group in self.groups]
        return [
            chunk.view(group.n_blocks, *group.block_shape)
            for chunk, group in zip(tensor.split(sizes), self.groups, strict=True)
        ]

    def merge(self, blocks: list[Tensor]) -> Tensor:
        return torch.cat([stack.reshape(-1) for stack in blocks])

    def take(self, tensor: Tensor) -> Tensor:
        """The part (a flat copy) of a tensor shaped like the whole parameter."""
        stacks = self.whole.split(tensor)  # type: ignore[union-attr]
        return torch.cat([stacks[g][start:stop].reshape(-1) for g, start, stop in self.segments])


@dataclass(frozen=True, eq=False)
class Split:
    """A parameter split across ranks: its ``plan`` and the part of every rank that owns blocks of it."""

    plan: BlockPlan
    parts: Mapping[int, PartPlan]

    @classmethod
    def of(cls, plan: BlockPlan, ranges: Sequence[Range]) -> Split:
        by_rank: dict[int, list[Segment]] = {}
        for rank, first, end in ranges:
            by_rank.setdefault(rank, []).extend(segments(plan, first, end))
        return cls(plan, {rank: PartPlan.of(plan, sorted(parts)) for rank, parts in sorted(by_rank.items())})

    def assemble(self, parts: Mapping[int, Tensor]) -> Tensor:
        """The whole tensor (the parameter's shape) from every rank's flat part."""
        pieces: list[list[tuple[int, Tensor]]] = [[] for _ in self.plan.groups]
        for rank, flat in parts.items():
            part = self.parts[rank]
            for (g, start, _), stack in zip(part.segments, part.split(flat), strict=True):
                pieces[g].append((start, stack))
        return self.plan.merge([_in_order(group) for group in pieces])

    def cut_state(self, rank: int, state: Mapping[str, Any]) -> dict[str, Any]:
        """``rank``'s part of the complete state of the parameter (per-block stacks sliced, moments taken)."""
        part, out = self.parts[rank], {}
        for key, value in state.items():
            if not isinstance(value, Tensor):
                out[key] = value
            elif _is_block_key(key):
                prefix, g, dim = key.rsplit("_", 2)
                for local, (group, start, stop) in enumerate(part.segments):
                    if group == int(g):
                        out[f"{prefix}_{local}_{dim}"] = value[start:stop]
            else:
                out[key] = part.take(value)
        return out

    def join_states(self, states: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
        """The complete state from every rank's part: stacks in block order, moments in the parameter's
        shape; a flag (bool) is raised if any part's is, other plain values are every part's."""
        joined: dict[str, Any] = {}
        blocks: dict[str, list[tuple[int, Tensor]]] = {}
        moments: dict[str, dict[int, Tensor]] = {}
        for rank, state in states.items():
            for key, value in state.items():
                if isinstance(value, Tensor) and _is_block_key(key):
                    prefix, local, dim = key.rsplit("_", 2)
                    g, start, _ = self.parts[rank].segments[int(local)]
                    key = f"{prefix}_{g}_{dim}"
                    blocks.setdefault(key, []).append((start, value))
                elif isinstance(value, Tensor):
                    moments.setdefault(key, {})[rank] = value
                elif isinstance(value, bool):
                    value = joined.get(key, False) or value
                joined[key] = value if not isinstance(value, Tensor) else None
        for key in joined:
            if key in blocks:
                joined[key] = _in_order(blocks[key])
            elif key in moments:
                joined[key] = self.assemble(moments[key])
        return joined

    def cut_entry(self, rank: int, entry: Mapping[str, Any]) -> list[dict[str, Any]]:
        """``rank``'s parts of one refresh in flight of the parameter (a factor's snapshot and result)."""
        g, dim = (int(x) for x in entry["snapshot"]["name"].split("_"))
        return [
            _entry(entry, f"{local}_{dim}", lambda value, _: value[start:stop])  # noqa: B023 (called at once)
            for local, (group, start, stop) in enumerate(self.parts[rank].segments)
            if group == g
        ]

    def join_entries(self, entries: Mapping[int, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
        """The complete refreshes in flight from every rank's parts, ordered by step, group and dim; a
        result only where every part has one."""
        found: dict[tuple[int, int, int, int], list[tuple[int, Mapping[str, Any]]]] = {}
        for rank, items in entries.items():
            for entry in items:
                local, dim = (int(x) for x in entry["snapshot"]["name"].split("_"))
                g, start, _ = self.parts[rank].segments[local]
                found.setdefault((entry["step"], entry["install_step"], g, dim), []).append((start, entry))
        out = []
        for (_, _, g, dim), pieces in sorted(found.items(), key=lambda item: item[0]):
            parts = [entry for _, entry in sorted(pieces, key=lambda item: item[0])]
            if any(entry["result"] is None for entry in parts):
                parts = [{**entry, "result": None} for entry in parts]
            out.append(_entry(parts[0], f"{g}_{dim}", _concatenated(parts)))
        return out


def _in_order(pieces: Iterable[tuple[int, Tensor]]) -> Tensor:
    return torch.cat([stack for _, stack in sorted(pieces, key=lambda item: item[0])])


def _is_block_key(key: str) -> bool:
    from .statedict import is_block_key

    return is_block_key(key)


def _entry(
    entry: Mapping[str, Any], name: str, per_block: Callable[[Tensor, tuple[str, str]], Tensor]
) -> dict[str, Any]:
    """``entry`` renamed to factor ``name``, every tensor of its snapshot and result (all per block along
    dim 0) replaced by ``per_block(tensor, (section, key))``."""
    snapshot = {
        key: per_block(value, ("snapshot", key)) if isinstance(value, Tensor) else value
        for key, value in entry["snapshot"].items()
    }
    snapshot["name"] = name
    result = entry["result"]
    if result is not None:
        result = {
            key: per_block(value, ("result", key)) if isinstance(value, Tensor) else value
            for key, value in result.items()
        }
    return {**entry, "snapshot": snapshot, "result": result}


def _concatenated(entries: Sequence[Mapping[str, Any]]) -> Callable[[Tensor, tuple[str, str]], Tensor]:
    """For :func:`_entry`: the tensor at ``(section, key)`` of every entry, stacked in order."""
    return lambda _, path: torch.cat([entry[path[0]][path[1]] for entry in entries])
