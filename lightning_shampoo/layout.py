"""Where Shampoo's work and state live across data-parallel ranks: one layout object, chosen once.

The optimizer asks its layout which parameters this rank computes (:meth:`Layout.owns`), for the plain
tensors it computes on (:meth:`Layout.local`), how those are cut into blocks (:meth:`Layout.plan`),
whether the ranks agree that a gradient is finite (:meth:`Layout.agree`), and runs
:meth:`Layout.after_step` once per step. State dicts go through the layout too: it turns this rank's
plain per-block state into what is saved (:meth:`Layout.export`) and back (:meth:`Layout.import_`), keeps
what this rank owns of a complete checkpoint and gathers the complete one (:meth:`Layout.gather`).

* :class:`Layout` — one process, or every rank does all the work (``distribute="replicated"``).
* :class:`OwnerSharded` — replicated parameters (DDP): every parameter has one owner rank from a
  deterministic, cost-balanced assignment; only the owner keeps its state and computes its update, and
  one all-gather per step copies every owner's parameters to the other ranks, bit for bit. A rank's state
  is exactly the single-process state of its parameters, so merging ranks' state is a union and loading on
  another number of ranks is a filter.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .blocking import BlockPlan

DISTRIBUTE_MODES = ("sharded", "replicated")
Planner = Callable[[tuple[int, ...]], BlockPlan]


def is_dtensor(tensor: object) -> bool:
    # A DTensor cannot exist before its module is imported, so the (slow) import is never forced here.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


class Layout:
    """Every parameter computed on this rank, plain tensors, nothing to communicate."""

    name = "replicated"

    def owns(self, index: int) -> bool:
        """Whether this rank keeps the state of parameter ``index`` (its position over all groups)."""
        return True

    def local(self, tensor: Tensor) -> Tensor:
        """The plain tensor this rank computes on (a view: in-place ops reach the original)."""
        return tensor

    def plan(self, param: Tensor, planner: Planner) -> BlockPlan:
        """The blocks of the part of ``param`` this rank preconditions."""
        return planner(tuple(param.shape))

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

    def extend(self, params: Sequence[Tensor], names: Sequence[str], costs: Sequence[float]) -> Layout:
        """The layout after ``params`` (all of them, new ones last) gained new parameters."""
        return self


# ---------------------------------------------------------------------------------------- DDP


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


class OwnerSharded(Layout):
    """Replicated parameters, each computed by its owner rank; one all-gather per step (see module doc).

    Collective to build (it checks that the parameters are replicated). ``previous``: the layout of the
    first parameters, which keep their owners (after ``add_param_group``).
    """

    name = "sharded"

    def __init__(
        self,
        group: Any,
        params: Sequence[Tensor],
        names: Sequence[str],
        costs: Sequence[float],
        previous: OwnerSharded | None = None,
    ) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        known = len(previous.owners) if previous is not None else 0
        _check_replicated(params[known:], names[known:], group, self.world_size)
        owners, self.loads = assign_owners(
            costs[known:], self.world_size, previous.loads if previous is not None else None
        )
        self.owners = (previous.owners if previous is not None else ()) + owners
        self._sync = ParameterSync(params, self.owners, self.rank, group)

    def owns(self, index: int) -> bool:
        return self.owners[index] == self.rank

    def after_step(self) -> None:
        self._sync()

    def shard_info(self) -> dict[str, Any]:
        return {"rank": self.rank, "owners": list(self.owners)}

    def gather(self, state_dict: dict[str, Any], to: int) -> dict[str, Any] | None:
        from .statedict import map_tensors, merge_state_dicts

        gathered: list[Any] | None = [None] * self.world_size if self.rank == to else None
        dst = to if self.group is None else dist.get_global_rank(self.group, to)
        dist.gather_object(
            map_tensors(state_dict, lambda t: t.detach().cpu()), gathered, dst=dst, group=self.group
        )
        return None if gathered is None else merge_state_dicts(gathered, to)

    def extend(self, params: Sequence[Tensor], names: Sequence[str], costs: Sequence[float]) -> Layout:
        return OwnerSharded(self.group, params, names, costs, previous=self)


def _check_replicated(params: Sequence[Tensor], names: Sequence[str], group: Any, world_size: int) -> None:
    """Collective: refuse parameters that differ between ranks, since owners overwrite the others' copies."""
    fingerprint = [
        (tuple(p.shape), str(p.dtype), float(torch.nan_to_num(p.detach().double()).sum())) for p in params
    ]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, fingerprint, group=group)
    for rank, other in enumerate(gathered):
        if len(other) != len(fingerprint):
            raise ValueError(
                f"Shampoo(distribute='sharded'): rank {rank} has {len(other)} parameters, this rank "
                f"{len(fingerprint)}. Sharding needs the same replicated parameters on every rank (DDP); "
                "pass distribute='replicated' or the data-parallel process_group."
            )
        for name, mine, theirs in zip(names, fingerprint, other, strict=True):
            if mine != theirs:
                raise ValueError(
                    f"Shampoo(distribute='sharded'): {name} differs between this rank and rank {rank}. "
                    "Owners overwrite the other ranks' copies, so parameters must start replicated: wrap "
                    "the model in DistributedDataParallel before the first step, or pass "
                    "distribute='replicated'."
                )


# Slot offsets are multiples of this many bytes, so every slot can be viewed as any dtype.
SLOT_ALIGNMENT = 16


def _aligned(size: int) -> int:
    return -(-size // SLOT_ALIGNMENT) * SLOT_ALIGNMENT


class ParameterSync:
    """The per-step collective: every owner's parameters, as raw bytes, all-gathered in one call.

    Each rank packs its own parameters into a byte buffer (slots aligned to :data:`SLOT_ALIGNMENT` bytes,
    padded to the longest rank's), one ``all_gather`` exchanges the buffers, and every rank copies the
    others' bytes into its parameters: mixed dtypes travel in one message and arrive bit for bit.
    """

    def __init__(self, params: Sequence[Tensor], owners: Sequence[int], rank: int, group: Any) -> None:
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"Shampoo(distribute='sharded') needs parameters on one device, got {devices}")
        self._rank, self._group = rank, group
        world_size = dist.get_world_size(group)
        used = [0] * world_size
        self._slots: list[tuple[Tensor, int, int, int]] = []  # (param, owner, offset, bytes)
        for param, owner in zip(params, owners, strict=True):
            size = param.numel() * param.element_size()
            self._slots.append((param, owner, used[owner], size))
            used[owner] = _aligned(used[owner] + size)
        self._width = max(used, default=0)
        device = next(iter(devices), torch.device("cpu"))
        self._send = torch.zeros(self._width, dtype=torch.uint8, device=device)
        self._received = torch.zeros(world_size * self._width, dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        if not self._width:
            return
        for param, owner, offset, size in self._slots:
            if owner == self._rank and size:
                self._send[offset : offset + size].copy_(param.detach().reshape(-1).view(torch.uint8))
        # Newer torch names all_gather_into_tensor (deprecated there) all_gather_single.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(self._received, self._send, group=self._group)
        for param, owner, offset, size in self._slots:
            if owner != self._rank and size:
                start = owner * self._width + offset
                chunk = self._received[start : start + size]
                param.detach().copy_(chunk.view(param.dtype).view(param.shape))


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
    mode: str, group: Any, params: Sequence[Tensor], names: Sequence[str], costs: Sequence[float]
) -> Layout:
    """The layout of ``params``: shard-local for DTensor parameters; owner-sharded (``mode="sharded"``) with
    an initialized process group of several ranks; else replicated. Collective when it shards."""
    if any(is_dtensor(p) for p in params):
        return ShardLocal(group)
    if mode == "replicated":
        return Layout()
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return Layout()
    if dist.get_world_size(group) == 1:
        return Layout()
    return OwnerSharded(group, params, names, costs)
