"""Loading a saved state dict, all or nothing: :func:`validate` checks the whole dict (structure, the
options that decide the layout, shapes, and values: finite, factors and roots symmetric, bases orthonormal,
second moments non-negative) and only then does the optimizer replace its state (:func:`prepare_load`,
:func:`restore`). The forms it reads are :mod:`.statedict`'s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

from . import triangles
from .options import STRUCTURAL_OPTIONS
from .statedict import (
    NONNEGATIVE_KEYS,
    ORTHONORMAL_PREFIXES,
    ORTHONORMALITY_TOLERANCE,
    SECTION,
    SYMMETRIC_PREFIXES,
    SYMMETRY_TOLERANCE,
    Progress,
    pending_entries,
    plain,
    unpack,
)


@dataclass(frozen=True)
class ParamSpec:
    """What the optimizer expects of one parameter's saved state: the saved shape of every tensor."""

    name: str
    owned: bool
    shapes: dict[str, tuple[int, ...]]


def validate(
    state_dict: dict[str, Any],
    groups: Sequence[dict[str, Any]],
    specs: Sequence[ParamSpec],
    preconditioner: str,
    load_values: bool = True,
) -> list[tuple[int, dict[str, Any]]]:
    """Check a saved state dict against the optimizer; ``(index, saved state)`` of the owned parameters.

    Raises ``ValueError`` naming the first problem and what to do; nothing is changed either way.
    ``load_values``: also check tensor values (shapes only when the values are not read yet). Either form.
    """
    state_dict = unpack(state_dict)
    for key in ("state", "param_groups"):
        if not isinstance(state_dict.get(key), dict | list):
            raise ValueError(f"Not an optimizer state dict: {key!r} is missing. Pass optimizer.state_dict().")
    extra = state_dict.get("shampoo", {})
    saved_kind = extra.get("preconditioner", "root_inverse")  # None: nothing saved tells (no factors)
    if saved_kind not in (None, preconditioner):
        raise ValueError(
            f"Shampoo checkpoint was saved with preconditioner={saved_kind!r}, the optimizer has "
            f"preconditioner={preconditioner!r}: construct the optimizer with preconditioner={saved_kind!r}."
        )
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"Shampoo checkpoint has {len(saved_groups)} parameter groups, the optimizer has {len(groups)}: "
            "build the optimizer with the same groups as the saved run."
        )
    keys = []
    for saved_group, group in zip(saved_groups, groups, strict=True):
        if len(saved_group["params"]) != len(group["params"]):
            raise ValueError(
                f"Shampoo checkpoint group has {len(saved_group['params'])} parameters, the optimizer's "
                f"has {len(group['params'])}: build the optimizer over the same parameters."
            )
        keys += [(key, saved_group, group) for key in saved_group["params"]]
    shard = extra.get("shard")
    pairs = []
    for index, ((key, saved_group, group), spec) in enumerate(zip(keys, specs, strict=True)):
        if not spec.owned:
            continue
        saved = state_dict["state"].get(key)
        if shard is not None and index in shard.get("split", ()):
            raise ValueError(
                f"Shampoo checkpoint holds only rank {shard['rank']}'s share of {spec.name}, whose blocks "
                "are split across ranks. Save after consolidate_state_dict() on every rank (Lightning and "
                "prepare_shampoo do it)."
            )
        if saved:
            _check_structure(saved_group, group, spec.name)
            _check_param_state(saved, spec, load_values)
            pairs.append((index, saved))
        elif shard is not None and shard["owners"][index] != shard["rank"]:
            raise ValueError(
                f"Shampoo checkpoint lacks the state of {spec.name}: it holds only rank {shard['rank']}'s "
                f"share of a sharded optimizer, and the parameter was rank {shard['owners'][index]}'s. Save "
                "after consolidate_state_dict() on every rank (Lightning and prepare_shampoo do it), or use "
                "the per-rank files of lightning_shampoo.checkpoint."
            )
    _check_extra(extra, specs, load_values)
    return pairs


OTHER_MODEL = "Was it saved for another model, or with other options?"


def _storage_hint(found: tuple[int, ...] | str, expected: tuple[int, ...]) -> str:
    """What to do when the shapes differ only by the storage of a symmetric stack (full or triangles)."""
    if not isinstance(found, tuple) or len(found) + len(expected) != 5 or found[0] != expected[0]:
        return ""
    full, packed = (found, expected) if len(found) == 3 else (expected, found)
    if full[1] != full[2] or triangles.size(full[1]) != packed[1]:
        return ""
    if len(found) == 3:
        return (
            "It holds full matrices where this optimizer keeps triangles (compact storage, "
            "factor_dtype=torch.bfloat16; earlier versions kept bfloat16 factors full): construct the "
            "optimizer with factor_dtype=torch.float32 to resume it."
        )
    return (
        "It holds the root inverse's matrices as triangles (compact storage): construct the optimizer with "
        "factor_dtype=torch.bfloat16 to resume it."
    )


def _check_structure(saved_group: dict[str, Any], group: dict[str, Any], name: str) -> None:
    for option in STRUCTURAL_OPTIONS:
        saved_value = saved_group.get(option, group[option])
        if saved_value != group[option]:
            raise ValueError(
                f"Shampoo checkpoint of {name} was saved with {option}={saved_value!r}, the optimizer has "
                f"{option}={group[option]!r}: construct the optimizer with {option}={saved_value!r}."
            )


def _check_param_state(saved: dict[str, Any], spec: ParamSpec, load_values: bool) -> None:
    for key, shape in spec.shapes.items():
        value = saved.get(key)
        found = tuple(value.shape) if isinstance(value, Tensor) else "missing"
        if found != shape:
            raise ValueError(
                f"Shampoo checkpoint does not match {spec.name}: state {key!r} has shape {found}, expected "
                f"{shape}. {_storage_hint(found, shape) or OTHER_MODEL}"
            )
    if not load_values:
        return
    step = saved.get("step")
    if isinstance(step, Tensor) and step.numel() == 1:
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, Integral | float) or step < 0 or step != int(step):
        raise ValueError(f"Shampoo checkpoint of {spec.name} has a step count {step!r}, not an integer >= 0.")
    for key in spec.shapes:
        problem = value_problem(key, saved[key])
        if problem:
            raise ValueError(
                f"Shampoo checkpoint of {spec.name} is corrupt: state {key!r} {problem}. Refusing to load it "
                "(the optimizer is unchanged); resume from an earlier checkpoint."
            )


def value_problem(key: str, value: Tensor) -> str:
    """What is wrong with a state tensor's values ('' if nothing): non-finite entries, an asymmetric factor
    or root, a basis that is not orthonormal, a negative second moment."""
    value = plain(value)
    if not value.is_floating_point():
        return ""
    data = value.detach().double()
    if not bool(data.isfinite().all()):
        return "holds non-finite values"
    if key.startswith(SYMMETRIC_PREFIXES) and data.numel():
        data = triangles.full(data)  # a packed stack is symmetric by construction; its diagonal still counts
        scale = data.abs().amax().clamp_min(torch.finfo(torch.float64).tiny)
        if float((data - data.mT).abs().amax() / scale) > SYMMETRY_TOLERANCE:
            return "is not symmetric"
        if key.startswith("factor_") and float(torch.diagonal(data, dim1=-2, dim2=-1).amin() / scale) < -1e-6:
            return "has a negative diagonal (statistics are sums of squares)"
    if key.startswith(ORTHONORMAL_PREFIXES) and data.numel():
        identity = torch.eye(data.shape[-1], dtype=torch.float64)
        if float((data.mT @ data - identity).abs().amax()) > ORTHONORMALITY_TOLERANCE:
            return "is not orthonormal"
    if key in NONNEGATIVE_KEYS and data.numel() and float(data.amin()) < 0:
        return "has negative entries (second moments are averages of squares)"
    return ""


def _check_extra(extra: dict[str, Any], specs: Sequence[ParamSpec], load_values: bool) -> None:
    """The optimizer-wide section: counters of the right types, refreshes in flight that fit the params."""
    where = "Shampoo checkpoint's 'shampoo' section"
    if not isinstance(extra, dict):
        raise ValueError(f"{where} is not a dict. Pass optimizer.state_dict().")
    step = extra.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, Integral) or step < 0:
        raise ValueError(f"{where} has step {step!r}, not an integer >= 0.")
    if not isinstance(extra.get("refresh_requested", False), bool):
        raise ValueError(f"{where} has refresh_requested {extra['refresh_requested']!r}, not a bool.")
    counters = extra.get("counters", {})
    if not isinstance(counters, dict) or not all(
        isinstance(k, str) and isinstance(v, Real) and math.isfinite(v) and v >= 0
        for k, v in counters.items()
    ):
        raise ValueError(f"{where} has counters {counters!r}, not a dict of finite numbers >= 0.")
    if not isinstance(extra.get("max_root_residual", 0.0), Real):
        raise ValueError(f"{where} has max_root_residual {extra['max_root_residual']!r}, not a number.")
    for entry in pending_entries(extra.get("engine", {}), where):
        snapshot = entry["snapshot"]
        index = snapshot["param_index"]
        if not isinstance(index, Integral) or not 0 <= index < len(specs):
            raise ValueError(f"{where} has a refresh in flight for parameter index {index!r}, out of range.")
        spec = specs[index]
        if not spec.owned:
            continue
        factor = f"factor_{snapshot['name']}"
        shape = spec.shapes.get(factor)
        result = entry["result"]
        # A computed refresh may be saved without its snapshot: then its results must fit.
        matrices = snapshot.get("matrices")
        if matrices is None and isinstance(result, dict):
            matrices = result.get("root", result.get("basis"))
        if shape is None or not isinstance(matrices, Tensor) or tuple(matrices.shape)[1:] != shape[1:]:
            raise ValueError(
                f"{where} has a refresh in flight of {spec.name}'s {factor!r} that does not match its state "
                f"(shape {tuple(matrices.shape) if isinstance(matrices, Tensor) else matrices!r}). Was it "
                "saved "
                "for another model?"
            )
        if load_values and result is not None:
            accepted = result.get("accepted")
            values = result.get("root", result.get("basis"))
            if not isinstance(accepted, Tensor) or not isinstance(values, Tensor):
                raise ValueError(f"{where} has a malformed refresh result of {spec.name}'s {factor!r}.")
            values, accepted = plain(values), plain(accepted)
            if not bool(values[accepted.bool()].isfinite().all()):
                raise ValueError(
                    f"Shampoo checkpoint is corrupt: an accepted refresh result of {spec.name} holds "
                    "non-finite "
                    "values. Refusing to load it (the optimizer is unchanged)."
                )


@dataclass
class Loading:
    """A validated state dict, ready to load: ``part`` (sectioned), what this rank keeps, for torch's
    ``load_state_dict``; the clock and the refreshes in flight."""

    part: dict[str, Any]
    progress: Progress
    engine: dict[str, Any]


def prepare_load(
    state_dict: dict[str, Any],
    groups: Sequence[dict[str, Any]],
    specs: Sequence[ParamSpec],
    preconditioner: str,
    keep: Callable[[dict[str, Any]], dict[str, Any]],
) -> Loading:
    """Unpack and validate ``state_dict`` (either form), then ``keep`` what this rank owns (the layout's
    cut of a validated sectioned dict); changes nothing."""
    sectioned = unpack(state_dict)
    validate(sectioned, groups, specs, preconditioner)
    part = keep(sectioned)
    extra = part.get("shampoo", {})
    if extra.get("lost_in_flight"):
        most, params = extra["lost_in_flight"]
        warnings.warn(
            f"Shampoo: {most} saved refresh(es) in flight of {params} parameters are missing from the "
            "loaded state dict: the loader kept only the refresh slots of a fresh optimizer's state dict (as "
            "dcp.load does). The run continues with the previous preconditioners until the next refresh, "
            "close to but not bitwise the saved run. For an exact resume keep refresh_lag <= "
            "precondition_frequency (one refresh in flight) or load the saved dict itself.",
            stacklevel=3,
        )
    return Loading(part, Progress.from_dict(extra), extra.get("engine", {}))


def check_owners(state: dict[Tensor, Any], params: Sequence[Tensor]) -> None:
    """Refuse state held for tensors that are no longer among the optimizer's parameters."""
    if len(state) > sum(param in state for param in params):
        raise RuntimeError(
            "Shampoo holds state for tensors no longer among its parameters: they were replaced (e.g. by "
            "accelerator.prepare with FSDP2) after the state was created or loaded. Prepare the model and "
            "optimizer first, then load checkpoints and step."
        )


def reserve(state: dict[str, Any]) -> None:
    """Add the reserved entry to a parameter's live state: empty, it only tells torch's flattened loader
    (which reads the keys the live state has) that the saved entry belongs there."""
    state[SECTION] = {}


def restore(
    state: dict[str, Any], saved: dict[str, Any], import_: Any, device: torch.device, dtype_of: Any
) -> None:
    """Put a parameter's saved state back after torch's ``load_state_dict``, which casts floating state to
    the parameter's dtype: Shampoo keeps plain local tensors in its own dtypes (``dtype_of(key)``)."""
    for key, value in saved.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            state[key] = import_(value).to(device=device, dtype=dtype_of(key), copy=True)
        elif key == "step":
            state[key] = int(value)
    reserve(state)
