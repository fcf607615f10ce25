"""Where Shampoo's work and state live across data-parallel ranks: one layout object, chosen once.

The optimizer asks its layout which parameters this rank computes (:meth:`Layout.owns`), for the plain
tensors it computes on (:meth:`Layout.local`; :meth:`Layout.weight` and :meth:`Layout.part`: the part of
them this rank computes), how those are cut into blocks (:meth:`Layout.plan`), whether the ranks agree that
a gradient is finite (:meth:`Layout.agree`), and runs :meth:`Layout.after_step` once per step. State dicts
go through the layout too: it turns this rank's plain per-block state into what is saved
(:meth:`Layout.export`) and back (:meth:`Layout.import_`), keeps what this rank owns of a complete
checkpoint (:meth:`Layout.keep`) and gathers the complete one (:meth:`Layout.gather`).

* :class:`Layout` — one process, or every rank does all the work (``distribute="replicated"``).
* :class:`OwnerSharded` — replicated parameters (DDP): every parameter has one owner rank from a
  deterministic, cost-balanced assignment, or, if it is too large to balance whole, its blocks are split
  into parts owned by several ranks (:mod:`.partition`); only the owners keep its state and compute its
  update, and one all-gather per step copies every owner's parameters and parts to the other ranks, bit
  for bit. A rank's state of a whole parameter is exactly the single-process state; a split parameter's
  parts join into it (stacks in block order). So merging ranks' state is a union (after the join), and
  loading on another number of ranks is a filter (and a cut).
* :class:`ShardLocal` — FSDP2 (DTensor parameters sharded along dim 0): each rank preconditions its local
  shard as blocks of its own, without communication. Uneven shards are planned at the common (ceil) shard
  length with zero rows appended (:class:`ShardPlan`): zero rows add nothing to any statistic and receive a
  zero update, so every rank has the same blocks and the saved per-block state is a DTensor stacked along
  the block dim, which ``torch.distributed.checkpoint`` keeps per rank. When ``block_size`` divides the
  shard length the blocks are those of the whole parameter, so the math equals the single-device run's.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .blocking import BlockPlan
from .cost import Work
from .partition import PartPlan, Split, assign
from .sync import ParameterSync, check_replicated

DISTRIBUTE_MODES = ("sharded", "replicated")
Planner = Callable[[tuple[int, ...]], BlockPlan]


def is_dtensor(tensor: object) -> bool:
    # A DTensor cannot exist before its module is imported, so the (slow) import is never forced here.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


class Layout:
    """Every parameter computed on this rank, plain tensors, nothing to communicate."""

    name = "replicated"
    _bound: tuple[weakref.ref, ...] = ()

    def bind(self, params: Sequence[Tensor]) -> Layout:
        """Remember the parameters this layout was chosen for (weakly: it never keeps one alive)."""
        self._bound = tuple(weakref.ref(param) for param in params)
        return self

    def bound_to(self, params: Sequence[Tensor]) -> bool:
        """Whether ``params`` are the very tensors this layout was chosen for: a wrapper may swap them
        after the optimizer exists (Accelerate's FSDP2 preparation puts in the sharded ones)."""
        return len(params) == len(self._bound) and all(
            ref() is p for ref, p in zip(self._bound, params, strict=True)
        )

    def owns(self, index: int) -> bool:
        """Whether this rank keeps the state of parameter ``index`` (its position over all groups)."""
        return True

    def local(self, tensor: Tensor) -> Tensor:
        """The plain tensor this rank holds (a view: in-place ops reach the original)."""
        return tensor

    def weight(self, param: Tensor) -> Tensor:
        """What this rank updates in place of ``param``: its local tensor, or the part of it this rank
        computes (a copy, which :meth:`after_step` writes back)."""
        return self.local(param)

    def part(self, param: Tensor, tensor: Tensor) -> Tensor:
        """The part this rank computes of ``tensor``, a local tensor shaped like ``param``'s (e.g. its
        gradient): all of it, or a copy of this rank's blocks of a parameter split across ranks."""
        return tensor

    def plan(self, param: Tensor, planner: Planner) -> BlockPlan:
        """The blocks of the part of ``param`` this rank preconditions."""
        return planner(tuple(param.shape))

    def saved_plan(self, param: Tensor, planner: Planner) -> BlockPlan:
        """The blocks of ``param``'s state as saved: this rank's (:meth:`plan`), or the whole parameter's
        where the saved state joins the parts of several ranks."""
        return self.plan(param, planner)

    def export(self, param: Tensor, value: Tensor, *, per_block: bool) -> Tensor:
        """State of ``param`` as saved: a per-block stack ``(n, …)`` or a tensor shaped like the local
        parameter."""
        return value

    def import_(self, value: Tensor) -> Tensor:
        """Inverse of :meth:`export`: the plain local stack of a saved value."""
        return value

    def saved_shape(self, param: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the saved per-block state whose local stack has ``shape``."""
        return shape

    def agree(self, flags: list[bool]) -> list[bool]:
        """Flags every rank agrees on (the AND over ranks where parameters are split across them)."""
        return flags

    def after_step(self) -> None:
        """The step's collective, if any, once every local parameter is updated."""

    def shard_info(self) -> dict[str, Any] | None:
        """What marks a state dict as one rank's share (``None``: it is complete)."""
        return None

    def gather(self, state_dict: dict[str, Any], to: int) -> dict[str, Any] | None:
        """The complete state dict on rank ``to`` from every rank's share (collective where sharded)."""
        return state_dict

    def keep(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """What this rank keeps of a complete (validated) state dict."""
        return state_dict

    def extend(self, params: Sequence[Tensor], names: Sequence[str], work: Sequence[Work]) -> Layout:
        """The layout after ``params`` (all of them, new ones last) gained new parameters."""
        return self.bind(params)


# ---------------------------------------------------------------------------------------- DDP


class OwnerSharded(Layout):
    """Replicated parameters, each computed by its owner rank or split by blocks across several; one
    all-gather per step (see the module doc and :mod:`.partition`).

    Collective to build (it checks that the parameters are replicated). ``work``: every parameter's blocks
    and costs. ``previous``: the layout of the first parameters, which keep their owners and parts (after
    ``add_param_group``).
    """

    name = "sharded"

    def __init__(
        self,
        group: Any,
        params: Sequence[Tensor],
        names: Sequence[str],
        work: Sequence[Work],
        previous: OwnerSharded | None = None,
    ) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        known = len(previous.ranges) if previous is not None else 0
        check_replicated(params[known:], names[known:], group, self.world_size)
        ranges, self.loads = assign(work[known:], self.world_size, previous.loads if previous else None)
        self.ranges = (previous.ranges if previous is not None else ()) + ranges
        # Owner of every whole parameter; -1 where split, with the parts of every rank in ``splits``.
        self.owners = tuple(r[0][0] if len(r) == 1 else -1 for r in self.ranges)
        self.splits = {i: Split.of(work[i].plan, r) for i, r in enumerate(self.ranges) if self.owners[i] < 0}
        self._indices = {param: i for i, param in enumerate(params)}
        self._weights: dict[int, Tensor] = {}  # this step's updated parts of split parameters
        self._sync = ParameterSync(params, self.owners, self.rank, group, self.splits)

    def owns(self, index: int) -> bool:
        split = self.splits.get(index)
        return self.owners[index] == self.rank if split is None else self.rank in split.parts

    def _part_plan(self, param: Tensor) -> PartPlan | None:
        split = self.splits.get(self._indices.get(param, -1))
        return split.parts.get(self.rank) if split is not None else None

    def weight(self, param: Tensor) -> Tensor:
        plan = self._part_plan(param)
        if plan is None:
            return param
        weight = self._weights[self._indices[param]] = plan.take(param.detach())
        return weight

    def part(self, param: Tensor, tensor: Tensor) -> Tensor:
        plan = self._part_plan(param)
        return tensor if plan is None else plan.take(tensor)

    def plan(self, param: Tensor, planner: Planner) -> BlockPlan:
        return self._part_plan(param) or planner(tuple(param.shape))

    def saved_plan(self, param: Tensor, planner: Planner) -> BlockPlan:
        return planner(tuple(param.shape))

    def after_step(self) -> None:
        self._sync(self._weights)
        self._weights.clear()

    def shard_info(self) -> dict[str, Any]:
        return {"rank": self.rank, "owners": list(self.owners), "split": sorted(self.splits)}

    def gather(self, state_dict: dict[str, Any], to: int) -> dict[str, Any] | None:
        from .statedict import map_tensors, merge_state_dicts

        gathered: list[Any] | None = [None] * self.world_size if self.rank == to else None
        dst = to if self.group is None else dist.get_global_rank(self.group, to)
        dist.gather_object(
            map_tensors(state_dict, lambda t: t.detach().cpu()), gathered, dst=dst, group=self.group
        )
        return None if gathered is None else merge_state_dicts(self._joined(gathered, to), to)

    def _joined(self, shares: list[dict[str, Any]], to: int) -> list[dict[str, Any]]:
        """The shares with every split parameter's parts (state and refreshes in flight) joined into the
        complete ones, in rank ``to``'s share."""
        from .statedict import pending_entries, pending_state

        if not self.splits:
            return shares
        keys = [key for group in shares[to]["param_groups"] for key in group["params"]]
        states = [dict(share["state"]) for share in shares]
        entries = [pending_entries(share["shampoo"]["engine"]) for share in shares]
        for index, split in self.splits.items():
            parts = {rank: states[rank].pop(keys[index], None) for rank in split.parts}
            if all(parts.values()):  # all or none: the parts step together
                states[to][keys[index]] = split.join_states(parts)
            mine = {
                rank: [e for e in entries[rank] if e["snapshot"]["param_index"] == index]
                for rank in split.parts
            }
            entries = [[e for e in items if e["snapshot"]["param_index"] != index] for items in entries]
            entries[to] += split.join_entries(mine)
        return [
            {**share, "state": state, "shampoo": {**share["shampoo"], "engine": pending_state(items)}}
            for share, state, items in zip(shares, states, entries, strict=True)
        ]

    def keep(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        from .statedict import owned_part, pending_entries, pending_state

        kept = owned_part(state_dict, [self.owns(i) for i in range(len(self.owners))])
        mine = {i: split for i, split in self.splits.items() if self.rank in split.parts}
        if not mine:
            return kept
        keys = [key for group in kept["param_groups"] for key in group["params"]]
        state = {
            key: mine[i].cut_state(self.rank, kept["state"][key]) if i in mine else kept["state"][key]
            for i, key in enumerate(keys)
            if key in kept["state"]
        }
        extra = dict(kept.get("shampoo", {}))
        if "engine" in extra:
            entries = []
            for entry in pending_entries(extra["engine"]):
                split = mine.get(entry["snapshot"]["param_index"])
                entries += split.cut_entry(self.rank, entry) if split is not None else [entry]
            extra["engine"] = pending_state(entries)
        return {**kept, "state": state, "shampoo": extra}

    def extend(self, params: Sequence[Tensor], names: Sequence[str], work: Sequence[Work]) -> Layout:
        return OwnerSharded(self.group, params, names, work, previous=self).bind(params)


# ---------------------------------------------------------------------------------------- FSDP2


@dataclass(frozen=True)
class ShardPlan(BlockPlan):
    """The blocks of a local shard planned at the common shard length; the real shard has ``rows`` rows.

    :meth:`split` appends zero rows, :meth:`merge` drops them again.
    """

    rows: int = 0

    def split(self, tensor: Tensor) -> list[Tensor]:
        missing = self.param_shape[0] - tensor.shape[0]
        if missing:
            tensor = torch.cat([tensor, tensor.new_zeros(missing, *tensor.shape[1:])])
        return super().split(tensor)

    def merge(self, blocks: list[Tensor]) -> Tensor:
        return super().merge(blocks)[: self.rows]


class ShardLocal(Layout):
    """DTensor parameters (FSDP2): every rank preconditions its own dim-0 shard (see module doc)."""

    name = "shard_local"

    def __init__(self, group: Any) -> None:
        self.group = group

    def local(self, tensor: Tensor) -> Tensor:
        return tensor.to_local() if is_dtensor(tensor) else tensor

    def plan(self, param: Tensor, planner: Planner) -> BlockPlan:
        if not is_dtensor(param) or param.dim() == 0:
            return planner(tuple(param.shape))
        rows = param.shape[0]
        for count in _shard_counts(param):
            rows = -(-rows // count)
        planned = planner((rows, *param.shape[1:]))
        real_rows = param.to_local().shape[0]
        if real_rows == rows:
            return planned
        return ShardPlan(planned.param_shape, planned.merged_shape, planned.groups, rows=real_rows)

    def export(self, param: Tensor, value: Tensor, *, per_block: bool) -> Tensor:
        if not is_dtensor(param):
            return value
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if not per_block:
            return DTensor.from_local(
                value,
                param.device_mesh,
                param.placements,
                run_check=False,
                shape=param.shape,
                stride=param.stride(),
            )
        # Every rank has the same number of blocks: their stacks make one tensor sharded along dim 0.
        placements = [Shard(0) if isinstance(p, Shard) else Replicate() for p in param.placements]
        return DTensor.from_local(value, param.device_mesh, placements, run_check=False)

    def import_(self, value: Tensor) -> Tensor:
        return value.to_local() if is_dtensor(value) else value

    def saved_shape(self, param: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
        if not is_dtensor(param):
            return shape
        return (shape[0] * math.prod(_shard_counts(param)), *shape[1:])

    def agree(self, flags: list[bool]) -> list[bool]:
        # The shards of a parameter must skip or apply a step together: their step counts must agree.
        values = torch.tensor(flags, dtype=torch.float32)
        dist.all_reduce(values, op=dist.ReduceOp.MIN, group=self.group)
        return [bool(v) for v in values.tolist()]


def _shard_counts(param: Tensor) -> list[int]:
    """Mesh sizes of the dims that shard ``param`` along dim 0; refuses any other sharding."""
    from torch.distributed.tensor import Replicate, Shard

    counts = []
    for dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            counts.append(param.device_mesh.size(dim))
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"Shampoo preconditions DTensor parameters sharded along dim 0 (FSDP2) or replicated; got "
                f"placements {param.placements} for a parameter of shape {tuple(param.shape)}."
            )
    return counts


# ---------------------------------------------------------------------------------------- choice


def choose_layout(
    mode: str, group: Any, params: Sequence[Tensor], names: Sequence[str], work: Sequence[Work]
) -> Layout:
    """The layout of ``params``, bound to them: shard-local for DTensor parameters; owner-sharded
    (``mode="sharded"``) with an initialized process group of several ranks; else replicated. Collective
    when it shards."""
    return _choose(mode, group, params, names, work).bind(params)


def _choose(
    mode: str, group: Any, params: Sequence[Tensor], names: Sequence[str], work: Sequence[Work]
) -> Layout:
    if any(is_dtensor(p) for p in params):
        return ShardLocal(group)
    if mode == "replicated":
        return Layout()
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return Layout()
    if dist.get_world_size(group) == 1:
        return Layout()
    return OwnerSharded(group, params, names, work)
