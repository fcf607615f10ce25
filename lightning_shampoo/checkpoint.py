"""Per-rank checkpoints of Shampoo's state with ``torch.distributed.checkpoint`` (DCP).

The complete state can also be gathered on one rank (``Shampoo.consolidate_state_dict``, what Lightning's
DDP saving does); for large models each rank writes its own part instead::

    dcp.save({"model": model.state_dict(), "optimizer": sharded_state_dict(optimizer)}, checkpoint_id=path)
    load_sharded_state_dict(optimizer, path)          # on any number of ranks, after building the optimizer

The flat dict written here names parameters (by their index in the optimizer) and blocks, never ranks:
``state.{i}.{key}`` per parameter, ``pending.{step}.{install_step}.{i}.{factor}.{field}`` per refresh in
flight, and ``meta`` (the parameter groups and step counters, the same on every rank). With parameters
sharded by owner (DDP) each key is written by its owner alone, so a checkpoint written on N ranks loads
on M: each rank reads what it owns now. Per-block state of DTensor parameters (FSDP2) is a DTensor, so
DCP keeps every rank's blocks; it reloads onto the same sharding (or any sharding whose shards
``block_size`` divides, where the blocks are those of the whole parameter).
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from . import distributed
from .distributed import local
from .optimizer import Shampoo

_RESULT_FIELDS = ("root", "residual", "accepted")


def sharded_state_dict(optimizer: Shampoo) -> dict[str, Any]:
    """This rank's part of ``optimizer``'s state as a flat dict for ``torch.distributed.checkpoint.save``.

    Call it on every rank and save the dicts together (DCP merges them).
    """
    state = optimizer._local_state_dict()
    extra = {key: value for key, value in state["shampoo"].items() if key not in ("engine", "shard")}
    flat: dict[str, Any] = {"meta": pickle.dumps({"param_groups": state["param_groups"], "shampoo": extra})}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            flat[f"state.{index}.{key}"] = value
    params = _params(optimizer)
    for entry in distributed.pending_entries(state["shampoo"]["engine"]):
        snapshot = entry["snapshot"]
        param = params[snapshot["param_index"]]
        prefix = _pending_prefix(entry)
        flat[f"{prefix}.matrices"] = distributed.block_state(param, snapshot["matrices"])
        flat[f"{prefix}.settings"] = (snapshot["exponent"], snapshot["epsilon"], snapshot["relative_epsilon"])
        if entry["result"] is not None:
            for field in _RESULT_FIELDS:
                flat[f"{prefix}.{field}"] = distributed.block_state(param, entry["result"][field])
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
    if "meta" not in saved:
        raise ValueError(
            f"No Shampoo state under {key!r} in checkpoint {checkpoint_id}: write it with sharded_state_dict."
        )
    holder: dict[str, Any] = {"meta": b""}
    dcp.load({key: holder}, checkpoint_id=checkpoint_id, storage_reader=storage_reader)
    meta = pickle.loads(holder["meta"])
    optimizer._resolve_sharding()
    # Shapes from the metadata (meta tensors) go through the optimizer's own checks before any read.
    probe: dict[int, dict[str, Any]] = {}
    for name, item in saved.items():
        if name.startswith("state."):
            _, index, field = name.split(".", 2)
            shape = torch.empty(item.size, device="meta") if isinstance(item, TensorStorageMetadata) else None
            probe.setdefault(int(index), {})[field] = shape
    optimizer._check_compatible({"param_groups": meta["param_groups"], "state": probe, "shampoo": {}})

    template = _template(optimizer, saved, probe)
    dcp.load({key: template}, checkpoint_id=checkpoint_id, storage_reader=storage_reader)
    optimizer.load_state_dict(_assemble(template, meta))


def _params(optimizer: Shampoo) -> list[Tensor]:
    return [param for _, _, param in optimizer._indexed_params()]


def _pending_prefix(entry: dict[str, Any]) -> str:
    snapshot = entry["snapshot"]
    return f"pending.{entry['step']}.{entry['install_step']}.{snapshot['param_index']}.{snapshot['name']}"


def _template(optimizer: Shampoo, saved: dict[str, Any], probe: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Tensors (DTensors where the optimizer's are) of the saved shapes for what this rank keeps."""
    indexed = list(optimizer._indexed_params())
    template: dict[str, Any] = {}
    for index, fields in probe.items():
        if not optimizer._owns(index):
            continue
        group, _, param = indexed[index]
        if not optimizer.state[param]:
            optimizer._init_state(group, param)
        live = optimizer.state[param]
        for field, saved_value in fields.items():
            value = live.get(field)
            if isinstance(value, Tensor):
                template[f"state.{index}.{field}"] = torch.empty_like(value)
            elif saved_value is None:  # a plain value (step count, flag), read from the checkpoint
                template[f"state.{index}.{field}"] = value
    for name in saved:
        if not (name.startswith("pending.") and name.endswith(".matrices")):
            continue
        entry = name[: -len(".matrices")]
        index, factor = entry.split(".")[3:5]
        if not optimizer._owns(int(index)):
            continue
        _, _, param = indexed[int(index)]
        stack = optimizer.state[param][f"factor_{factor}"]
        template[name] = torch.empty_like(stack)
        template[f"{entry}.settings"] = None
        if f"{entry}.root" in saved:
            template[f"{entry}.root"] = torch.empty_like(stack)
            for field in ("residual", "accepted"):
                dtype = saved[f"{entry}.{field}"].properties.dtype
                rows = torch.empty(local(stack).shape[0], dtype=dtype, device=local(stack).device)
                template[f"{entry}.{field}"] = distributed.block_state(param, rows)
    return template


def _assemble(template: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The loaded flat dict back in ``Shampoo.state_dict`` form."""
    state: dict[int, dict[str, Any]] = {}
    entries = []
    for name, value in template.items():
        if name.startswith("state."):
            _, index, field = name.split(".", 2)
            state.setdefault(int(index), {})[field] = value
        elif name.startswith("pending.") and name.endswith(".matrices"):
            entry = name[: -len(".matrices")]
            _, step, install_step, index, factor = entry.split(".")
            exponent, epsilon, relative_epsilon = template[f"{entry}.settings"]
            result = None
            if f"{entry}.root" in template:
                result = {field: local(template[f"{entry}.{field}"]) for field in _RESULT_FIELDS}
            snapshot = {
                "param_index": int(index),
                "name": factor,
                "matrices": local(value),
                "exponent": exponent,
                "epsilon": epsilon,
                "relative_epsilon": relative_epsilon,
            }
            entries.append(
                {"step": int(step), "install_step": int(install_step), "snapshot": snapshot, "result": result}
            )
    extra = {**meta["shampoo"], "engine": distributed.pending_state(entries)}
    return {"state": state, "param_groups": meta["param_groups"], "shampoo": extra}
