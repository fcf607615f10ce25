"""The collectives of owner-sharded training (DDP, :class:`~.layout.OwnerSharded`): the per-step
all-gather of every owner's parameters and parts (:class:`ParameterSync`), and the check, once, that the
parameters start replicated (:func:`check_replicated`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .partition import Split


def check_replicated(params: Sequence[Tensor], names: Sequence[str], group: Any, world_size: int) -> None:
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
    """The per-step collective: every owner's parameters and parts, as raw bytes, all-gathered in one call.

    Each rank packs what it owns (whole parameters; for a parameter split across ranks, its part: see
    :class:`~.partition.Split`) into a byte buffer (slots aligned to :data:`SLOT_ALIGNMENT` bytes, padded to
    the longest rank's), one ``all_gather`` exchanges the buffers, and every rank copies the others' bytes
    into its parameters and assembles the split ones from all parts: mixed dtypes travel in one message and
    arrive bit for bit, so the parameters stay identical on every rank. ``owners[i]`` is ``-1`` for a split
    parameter (``splits[i]``).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        owners: Sequence[int],
        rank: int,
        group: Any,
        splits: Mapping[int, Split] | None = None,
    ) -> None:
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"Shampoo(distribute='sharded') needs parameters on one device, got {devices}")
        self._rank, self._group, self._params, self._splits = rank, group, params, dict(splits or {})
        world_size = dist.get_world_size(group)
        used = [0] * world_size
        self._slots: list[tuple[int, int, int, int]] = []  # (parameter index, rank, offset, bytes)
        for index, (param, owner) in enumerate(zip(params, owners, strict=True)):
            split = self._splits.get(index)
            pieces = (
                {owner: param.numel()}
                if split is None
                else {r: p.param_shape[0] for r, p in split.parts.items()}
            )
            for holder, numel in pieces.items():
                size = numel * param.element_size()
                self._slots.append((index, holder, used[holder], size))
                used[holder] = _aligned(used[holder] + size)
        self._width = max(used, default=0)
        device = next(iter(devices), torch.device("cpu"))
        self._send = torch.zeros(self._width, dtype=torch.uint8, device=device)
        self._received = torch.zeros(world_size * self._width, dtype=torch.uint8, device=device)

    def __call__(self, parts: Mapping[int, Tensor] | None = None) -> None:
        """Exchange; ``parts``: this step's updated parts of split parameters (others are read from the
        parameter)."""
        if not self._width:
            return
        parts = parts or {}
        for index, holder, offset, size in self._slots:
            if holder == self._rank and size:
                param = self._params[index].detach()
                split = self._splits.get(index)
                if split is not None:
                    param = parts[index] if index in parts else split.parts[holder].take(param)
                self._send[offset : offset + size].copy_(param.reshape(-1).view(torch.uint8))
        # Newer torch names all_gather_into_tensor (deprecated there) all_gather_single.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(self._received, self._send, group=self._group)
        received: dict[int, dict[int, Tensor]] = {}
        for index, holder, offset, size in self._slots:
            param = self._params[index].detach()
            start = holder * self._width + offset
            chunk = self._received[start : start + size].view(param.dtype)
            if index in self._splits:
                received.setdefault(index, {})[holder] = chunk
            elif holder != self._rank and size:
                param.copy_(chunk.view(param.shape))
        for index, chunks in received.items():
            self._params[index].detach().copy_(self._splits[index].assemble(chunks))
