"""Data-parallel Shampoo on ``torch.distributed``: who computes what, and the one collective per step.

Two layouts of the parameters, two ways to split the work:

* **Replicated parameters (DDP)** — every parameter gets one *owner* rank from a deterministic,
  cost-balanced assignment (:func:`assign_owners`). Only the owner keeps the parameter's moments, factors
  and roots, snapshots its factors for refresh and computes its update; after the update
  :class:`ParameterSync` all-gathers every owner's parameters as raw bytes in one collective, so the
  parameters stay bitwise identical on all ranks.

  The unit of ownership is the parameter with all its blocks. Its moments and its grafting (the diagonal
  update, elementwise over the parameter, rescales each block) then need no communication, and a rank's
  state is exactly the single-process state of its parameters: merging ranks' state is a union,
  reloading it on another number of ranks is a filter. The price is balance: the most loaded rank carries
  at most the optimum plus the costliest parameter, which for models built of many similar layers is a
  few percent, but a model dominated by one huge matrix does not split.

* **Sharded parameters (FSDP2 DTensors)** — each rank preconditions its local dim-0 shard as blocks of its
  own, without communication. Shards of uneven length are planned at the common (ceil) shard length with
  zero rows appended (:class:`ShardPlan`): zero rows add nothing to any statistic and receive a zero
  update, so every rank has the same blocks and the per-block state can be a DTensor stacked along the
  block dim — which ``torch.distributed.checkpoint`` saves and loads per rank (plain per-rank tensors it
  would treat as replicated, keeping one rank's). When ``block_size`` divides the shard length the blocks
  and their order are those of the whole parameter, so the math and the state equal the single-device
  run's.
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

# Relative weights of the cost model: a root refresh (eigendecomposition + products) per factor of size d
# is ~ROOT_FLOPS·d³; the elementwise work (moments, graft, update) is ~ELEMENTWISE_FLOPS per element.
ROOT_FLOPS = 10.0
ELEMENTWISE_FLOPS = 10.0


# ---------------------------------------------------------------------------------------- assignment


def parameter_cost(plan: BlockPlan, precondition_frequency: int) -> float:
    """Work of one parameter per step, in flops.

    Per block: the statistics ``G₍ᵢ₎G₍ᵢ₎ᵀ`` and the products ``×ᵢPᵢ`` cost ``2·numel·Σᵢdᵢ`` (``2mn(m+n)``
    for an ``m×n`` block), the roots ``ROOT_FLOPS·Σᵢdᵢ³`` every ``precondition_frequency`` steps; the
    elementwise work is ``ELEMENTWISE_FLOPS`` per element of the parameter.
    """
    cost = ELEMENTWISE_FLOPS * math.prod(plan.param_shape)
    for group in plan.groups:
        dims = [size for size, keep in zip(group.block_shape, group.preconditioned, strict=True) if keep]
        per_block = 2.0 * math.prod(group.block_shape) * sum(dims)
        per_block += ROOT_FLOPS * sum(d**3 for d in dims) / precondition_frequency
        cost += group.n_blocks * per_block
    return cost


def assign_owners(costs: Sequence[float], world_size: int) -> tuple[int, ...]:
    """Owner rank of every item: longest-processing-time greedy (costliest first, to the least loaded rank).

    Deterministic (ties go to the lower index and the lower rank), so every rank computes the same
    assignment; the most loaded rank exceeds the optimum by at most the costliest item.
    """
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return tuple(owners)


@dataclass(frozen=True)
class Sharding:
    """Which rank of ``group`` (``None``: the default group) owns each parameter, in optimizer order."""

    group: Any
    rank: int
    world_size: int
    owners: tuple[int, ...]

    def owns(self, index: int) -> bool:
        return self.owners[index] == self.rank


def shard_parameters(
    mode: str,
    group: Any,
    params: Sequence[Tensor],
    names: Sequence[str],
    costs: Sequence[float],
) -> Sharding | None:
    """The ownership of ``params`` over the data-parallel group, or ``None`` when every rank does all.

    ``None`` for ``mode="replicated"``, without an initialized process group of more than one rank, and
    for DTensor parameters (those are preconditioned shard-locally). Collective on first use: it checks
    that the parameters are replicated, since owners overwrite the other ranks' copies.
    """
    if mode == "replicated" or any(is_dtensor(p) for p in params):
        return None
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return None
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return None
    _check_replicated(params, names, group, world_size)
    return Sharding(group, dist.get_rank(group), world_size, assign_owners(costs, world_size))


def _check_replicated(params: Sequence[Tensor], names: Sequence[str], group: Any, world_size: int) -> None:
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


# ---------------------------------------------------------------------------------------- per step


def _all_gather_into(output: Tensor, chunk: Tensor, group: Any) -> None:
    # Newer torch names all_gather_into_tensor (deprecated there) all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, chunk, group=group)


def _as_bytes(param: Tensor) -> Tensor:
    return param.detach().reshape(-1).view(torch.uint8)


class ParameterSync:
    """The per-step collective: every owner's parameters, as raw bytes, all-gathered in one call.

    Each rank packs its own parameters into a byte buffer padded to the longest rank's, one
    ``all_gather`` exchanges the buffers, and every rank copies the others' bytes into its parameters:
    mixed dtypes travel in one message and arrive bit for bit.
    """

    def __init__(self, params: Sequence[Tensor], sharding: Sharding) -> None:
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"Shampoo(distribute='sharded') needs parameters on one device, got {devices}")
        self._sharding = sharding
        used = [0] * sharding.world_size
        self._slots: list[tuple[Tensor, int, int, int]] = []  # (param, owner, offset, bytes)
        for param, owner in zip(params, sharding.owners, strict=True):
            size = param.numel() * param.element_size()
            self._slots.append((param, owner, used[owner], size))
            used[owner] += size
        self._width = max(used)
        device = next(iter(devices))
        self._send = torch.zeros(self._width, dtype=torch.uint8, device=device)
        self._received = torch.zeros(sharding.world_size * self._width, dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        if not self._width:
            return
        rank = self._sharding.rank
        for param, owner, offset, size in self._slots:
            if owner == rank and size:
                self._send[offset : offset + size].copy_(_as_bytes(param))
        _all_gather_into(self._received, self._send, self._sharding.group)
        for param, owner, offset, size in self._slots:
            if owner != rank and size:
                start = owner * self._width + offset
                chunk = self._received[start : start + size]
                param.detach().copy_(chunk.view(param.dtype).view(param.shape))


# ---------------------------------------------------------------------------------------- DTensor shards


def is_dtensor(tensor: object) -> bool:
    # A DTensor cannot exist before its module is imported, so the (slow) import is never forced here.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: Tensor) -> Tensor:
    """The tensor this rank computes on: a DTensor's local shard (a view: in-place ops reach it)."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


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


def plan_local_blocks(param: Tensor, plan: Callable[[tuple[int, ...]], BlockPlan]) -> BlockPlan:
    """``plan`` applied to the shape this rank preconditions: the whole parameter, or its padded shard."""
    if not is_dtensor(param) or param.dim() == 0:
        return plan(tuple(param.shape))
    rows = param.shape[0]
    for count in _shard_counts(param):
        rows = -(-rows // count)
    planned = plan((rows, *param.shape[1:]))
    real_rows = param.to_local().shape[0]
    if real_rows == rows:
        return planned
    return ShardPlan(planned.param_shape, planned.merged_shape, planned.groups, rows=real_rows)


def block_state(param: Tensor, stack: Tensor) -> Tensor:
    """Per-block state ``(n, …)`` of ``param`` as stored: for a DTensor parameter, a DTensor whose global
    view stacks every shard's blocks (every rank has ``n`` of them), so checkpoints keep each rank's."""
    if not is_dtensor(param):
        return stack
    from torch.distributed.tensor import DTensor, Replicate, Shard

    placements = [Shard(0) if isinstance(p, Shard) else Replicate() for p in param.placements]
    return DTensor.from_local(stack, param.device_mesh, placements, run_check=False)


def block_state_shape(param: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the stored per-block state whose local stack has ``shape`` (see :func:`block_state`)."""
    if not is_dtensor(param):
        return shape
    return (shape[0] * math.prod(_shard_counts(param)), *shape[1:])


def agree(flags: list[bool], group: Any) -> list[bool]:
    """Element-wise AND of ``flags`` over the ranks (one all-reduce), so every shard of a parameter skips
    or applies a step together."""
    values = torch.tensor(flags, dtype=torch.float32)
    dist.all_reduce(values, op=dist.ReduceOp.MIN, group=group)
    return [bool(v) for v in values.tolist()]


# ---------------------------------------------------------------------------------------- state dicts


def pending_entries(engine_state: dict[str, Any]) -> list[dict[str, Any]]:
    """The refresh engine's pending refreshes, one entry per snapshot (with its result, if computed)."""
    entries = []
    for ticket in engine_state.get("pending", []):
        results = ticket.get("results") or [None] * len(ticket["snapshots"])
        for snapshot, result in zip(ticket["snapshots"], results, strict=True):
            entries.append(
                {
                    "step": ticket["step"],
                    "install_step": ticket["install_step"],
                    "snapshot": snapshot,
                    "result": result,
                }
            )
    return entries


def pending_state(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Inverse of :func:`pending_entries`: tickets in step order, snapshots in parameter order; a ticket
    keeps results only if all its snapshots have one (the others are recomputed, to the same bits)."""
    tickets: dict[tuple[int, int], list[dict[str, Any]]] = {}
    ordered = sorted(entries, key=lambda e: (e["step"], e["install_step"], e["snapshot"]["param_index"]))
    for entry in ordered:
        tickets.setdefault((entry["step"], entry["install_step"]), []).append(entry)
    pending = []
    for (step, install_step), members in tickets.items():
        ticket: dict[str, Any] = {
            "step": step,
            "install_step": install_step,
            "snapshots": [e["snapshot"] for e in members],
        }
        if all(e["result"] is not None for e in members):
            ticket["results"] = [e["result"] for e in members]
        pending.append(ticket)
    return {"pending": pending}


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(item) for item in value)
    return value


def gather_state_dicts(state_dict: dict[str, Any], to: int, sharding: Sharding) -> dict[str, Any] | None:
    """Collective: every rank's (partial) optimizer state dict merged into the complete one on rank ``to``
    of the group (``None`` elsewhere). Tensors travel through host memory."""
    gathered: list[Any] | None = [None] * sharding.world_size if sharding.rank == to else None
    dst = to if sharding.group is None else dist.get_global_rank(sharding.group, to)
    dist.gather_object(_to_cpu(state_dict), gathered, dst=dst, group=sharding.group)
    return None if gathered is None else merge_state_dicts(gathered, to)


def merge_state_dicts(parts: Sequence[dict[str, Any]], base: int) -> dict[str, Any]:
    """The complete state dict from the ranks' partial ones: the union of the per-parameter states and of
    the pending refreshes; the optimizer-wide counters are rank ``base``'s."""
    merged = dict(parts[base])
    merged["state"] = {key: value for part in parts for key, value in part["state"].items() if value}
    extra = {key: value for key, value in parts[base]["shampoo"].items() if key != "shard"}
    extra["engine"] = pending_state([e for part in parts for e in pending_entries(part["shampoo"]["engine"])])
    merged["shampoo"] = extra
    return merged
