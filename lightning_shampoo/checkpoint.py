"""Per-rank checkpoints of Shampoo's state with ``torch.distributed.checkpoint`` (DCP).

The complete state can also be gathered on one rank (``Shampoo.consolidate_state_dict``, what Lightning's
DDP saving does); for large models each rank writes its own part instead::

    dcp.save({"model": model.state_dict(), "optimizer": sharded_state_dict(optimizer)}, checkpoint_id=path)
    load_sharded_state_dict(optimizer, path)          # on any number of ranks, after building the optimizer

The flat dict written here names parameters (by their index in the optimizer) and blocks, never ranks:
``state.{i}.{key}`` per parameter, ``pending.{step}.{install_step}.{i}.{factor}.{field}`` per refresh in
flight, and ``meta`` (the parameter groups and step counters, the same on every rank). Every entry is a
tensor (plain values travel as JSON bytes in a uint8 tensor), so loading never unpickles anything. With
parameters sharded by owner (DDP) each key is written by its owner alone, so a checkpoint written on N
ranks loads on M: each rank reads what it owns now. Per-block state of DTensor parameters (FSDP2) is a
DTensor, so DCP keeps every rank's blocks; it reloads onto the same sharding (or any sharding whose shards
``block_size`` divides, where the blocks are those of the whole parameter).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from . import statedict
from .optimizer import Shampoo

_RESULT_FIELDS = {
    "root": ("root", "residual", "accepted"),
    "basis": ("basis", "residual", "accepted", "full", "kept"),
}


def encode(value: Any) -> Tensor:
    """Plain values (JSON) as a uint8 tensor: DCP saves tensors without pickling them."""
    try:
        text = json.dumps(value)
    except TypeError as error:
        raise TypeError(
            f"Shampoo's per-rank checkpoint stores plain values (numbers, strings, lists) only: {error}. "
            "Keep "
            "parameter-group options plain (e.g. a float lr, not a tensor)."
        ) from error
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def decode(tensor: Tensor) -> Any:
    return json.loads(bytes(tensor.tolist()).decode())


def sharded_state_dict(optimizer: Shampoo) -> dict[str, Any]:
    """This rank's part of ``optimizer``'s state, a flat dict of tensors for ``torch.distributed.checkpoint``.

    Call it on every rank and save the dicts together (DCP merges them).
    """
    state = statedict.unpack(optimizer.shard_state_dict())  # tensors already as saved (DTensor per block)
    if state["shampoo"].get("shard", {}).get("split"):
        raise ValueError(
            "Shampoo splits the blocks of a large parameter across ranks (distribute='sharded'), which these "
            "per-rank files cannot store yet: save optimizer.state_dict() after consolidate_state_dict() on "
            "every rank instead (it loads on any number of ranks)."
        )
    extra = {key: value for key, value in state["shampoo"].items() if key not in ("engine", "shard")}
    flat: dict[str, Any] = {"meta": encode({"param_groups": state["param_groups"], "shampoo": extra})}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            flat[f"state.{index}.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    for entry in statedict.pending_entries(state["shampoo"]["engine"]):
        snapshot, prefix = entry["snapshot"], _pending_prefix(entry)
        flat[f"{prefix}.request"] = encode(snapshot["request"])
        for field in ("matrices", "previous"):
            if snapshot.get(field) is not None:
                flat[f"{prefix}.{field}"] = snapshot[field]
        if entry["result"] is not None:
            result = entry["result"]
            flat[f"{prefix}.kind"] = encode(result["kind"])
            for field in _RESULT_FIELDS[result["kind"]]:
                flat[f"{prefix}.{field}"] = result[field]
    return flat


def load_sharded_state_dict(
    optimizer: Shampoo,
    checkpoint_id: str | os.PathLike[str] | None = None,
    *,
    storage_reader: dcp.StorageReader | None = None,
    key: str = "optimizer",
) -> None:
    """Load the state saved by :func:`sharded_state_dict` under ``key`` (collective: every rank calls it).

    Each rank reads the parameters it owns now (all, unsharded); the structure and shapes are checked
    against the optimizer before any tensor is read, with the errors of ``Shampoo.load_state_dict``.
    """
    if storage_reader is None:
        if checkpoint_id is None:
            raise ValueError("load_sharded_state_dict needs a checkpoint_id or a storage_reader")
        storage_reader = dcp.FileSystemReader(checkpoint_id)
    prefix = f"{key}."
    saved = {
        fqn[len(prefix) :]: item
        for fqn, item in storage_reader.read_metadata().state_dict_metadata.items()
        if fqn.startswith(prefix)
    }
    if "meta" not in saved or not isinstance(saved["meta"], TensorStorageMetadata):
        raise ValueError(
            f"No Shampoo state under {key!r} in checkpoint {checkpoint_id}: write it with sharded_state_dict."
        )
    holder = {"meta": torch.empty(saved["meta"].size, dtype=torch.uint8)}
    dcp.load({key: holder}, checkpoint_id=checkpoint_id, storage_reader=storage_reader)
    meta = decode(holder["meta"])
    layout = optimizer.layout  # decided now (a collective where sharded), before choosing what to read
    # Shapes from the metadata (meta tensors) go through the optimizer's own checks before any read.
    probe: dict[int, dict[str, Any]] = {}
    for name, item in saved.items():
        if name.startswith("state."):
            _, index, field = name.split(".", 2)
            probe.setdefault(int(index), {})[field] = torch.empty(item.size, device="meta")
    optimizer.check_state_dict(
        {"param_groups": meta["param_groups"], "state": probe, "shampoo": meta["shampoo"]}, load_values=False
    )
    template = _template(optimizer, saved, probe, layout)
    dcp.load({key: template}, checkpoint_id=checkpoint_id, storage_reader=storage_reader)
    optimizer.load_state_dict(_assemble(template, meta))


def _params(optimizer: Shampoo) -> list[Tensor]:
    return [param for group in optimizer.param_groups for param in group["params"]]


def _pending_prefix(entry: dict[str, Any]) -> str:
    snapshot = entry["snapshot"]
    return f"pending.{entry['step']}.{entry['install_step']}.{snapshot['param_index']}.{snapshot['name']}"


def _template(
    optimizer: Shampoo, saved: dict[str, Any], probe: dict[int, dict[str, Any]], layout: Any
) -> dict[str, Any]:
    """Tensors (DTensors where the optimizer's are) of the saved shapes for what this rank keeps."""
    params = _params(optimizer)
    template: dict[str, Any] = {}
    fresh: dict[int, dict[str, Any]] = {}
    for index, fields in probe.items():
        if not layout.owns(index):
            continue
        fresh[index] = optimizer.fresh_state(index)
        for field in fields:
            value = fresh[index].get(field)
            like = value if isinstance(value, Tensor) else torch.tensor(value if value is not None else 0)
            template[f"state.{index}.{field}"] = torch.empty_like(like)
    for name, item in saved.items():
        if not name.startswith("pending."):
            continue
        entry, field = name.rsplit(".", 1)
        index, factor = entry.split(".")[3:5]
        if not layout.owns(int(index)):
            continue
        if field in ("request", "kind"):
            template[name] = torch.empty(item.size, dtype=torch.uint8)
            continue
        stack = fresh.get(int(index)) or optimizer.fresh_state(int(index))
        like = stack[f"factor_{factor}"]
        if field in ("residual", "accepted", "full", "kept"):  # one value per block
            local = layout.import_(like)
            rows = torch.empty(local.shape[0], dtype=item.properties.dtype, device=local.device)
            template[name] = layout.export(params[int(index)], rows, per_block=True)
        else:
            template[name] = torch.empty_like(like)
    return template


def _assemble(template: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The loaded flat dict back in ``Shampoo.state_dict`` form."""
    state: dict[int, dict[str, Any]] = {}
    entries = []
    for name, value in template.items():
        if name.startswith("state."):
            _, index, field = name.split(".", 2)
            state.setdefault(int(index), {})[field] = value if value.dim() else value.item()
        elif name.startswith("pending.") and name.endswith(".request"):
            entry = name[: -len(".request")]
            _, step, install_step, index, factor = entry.split(".")
            result = None
            if f"{entry}.kind" in template:
                kind = decode(template[f"{entry}.kind"])
                result = {"kind": kind, **{f: template[f"{entry}.{f}"] for f in _RESULT_FIELDS[kind]}}
            snapshot = {"param_index": int(index), "name": factor, "request": decode(value)}
            for field in ("matrices", "previous"):
                if f"{entry}.{field}" in template:
                    snapshot[field] = template[f"{entry}.{field}"]
            entries.append(
                {"step": int(step), "install_step": int(install_step), "snapshot": snapshot, "result": result}
            )
    extra = {**meta["shampoo"], "engine": statedict.pending_state(entries)}
    return {"state": state, "param_groups": meta["param_groups"], "shampoo": extra}
