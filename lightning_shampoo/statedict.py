"""Shampoo's state dict: what it holds, how a saved one is checked before anything loads, how ranks merge.

A state dict is torch's ``{"state", "param_groups"}`` keyed by parameter index (never by rank) plus
``"shampoo"``: the optimizer-wide clock and counters and the refreshes in flight (``"engine"``). Loading
is all or nothing: :func:`validate` checks the whole dict (structure, options that decide the layout,
shapes, and values: finite, factors and roots symmetric, bases orthonormal, second moments
non-negative) and only then does the optimizer replace its state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

from .options import STRUCTURAL_OPTIONS

# Per-block state keys (stacks of matrices) by prefix, and what their values must satisfy.
SYMMETRIC_PREFIXES = ("factor_", "root_")
ORTHONORMAL_PREFIXES = ("basis_",)
BLOCK_PREFIXES = SYMMETRIC_PREFIXES + ORTHONORMAL_PREFIXES
NONNEGATIVE_KEYS = ("graft_sq", "exp_avg_sq")
# Relative tolerances of the value checks: far above fp32 (and bf16) rounding, far below a corrupted entry.
SYMMETRY_TOLERANCE = 1e-2
ORTHONORMALITY_TOLERANCE = 5e-2


COUNTERS = ("nonfinite_skips", "refreshes", "roots_accepted", "roots_rejected", "rejected_refreshes")


@dataclass
class Progress:
    """The optimizer-wide clock and counters: the refresh schedule runs on ``step``; saved with the state
    (``state_dict()["shampoo"]``) and reported by ``metrics()``."""

    step: int = 0
    refresh_requested: bool = False
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    max_root_residual: float = 0.0

    def record_install(self, accepted: int, rejected: int, residuals: Tensor) -> None:
        """Count one step's installed results (``residuals`` of all of them, ``inf`` where none)."""
        self.counters["roots_accepted"] += accepted
        self.counters["roots_rejected"] += rejected
        self.counters["rejected_refreshes"] += int(bool(rejected) and not accepted)
        finite = residuals[residuals.isfinite()]
        if finite.numel():
            self.max_root_residual = max(self.max_root_residual, float(finite.max()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "refresh_requested": self.refresh_requested,
            "counters": dict(self.counters),
            "max_root_residual": self.max_root_residual,
        }

    @classmethod
    def from_dict(cls, extra: dict[str, Any]) -> Progress:
        """From a validated ``"shampoo"`` section (missing entries: a fresh optimizer's)."""
        progress = cls(int(extra.get("step", 0)), bool(extra.get("refresh_requested", False)))
        progress.counters.update({key: int(value) for key, value in extra.get("counters", {}).items()})
        progress.max_root_residual = float(extra.get("max_root_residual", 0.0))
        return progress

    def metrics(self) -> dict[str, float]:
        return {
            **{name: float(value) for name, value in self.counters.items()},
            "max_root_residual": self.max_root_residual,
            "step": float(self.step),
        }


def is_block_key(key: str) -> bool:
    return key.startswith(BLOCK_PREFIXES)


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
    ``load_values``: also check tensor values (shapes only when the values are not read yet).
    """
    for key in ("state", "param_groups"):
        if not isinstance(state_dict.get(key), dict | list):
            raise ValueError(f"Not an optimizer state dict: {key!r} is missing. Pass optimizer.state_dict().")
    extra = state_dict.get("shampoo", {})
    saved_kind = extra.get("preconditioner", "root_inverse")
    if saved_kind != preconditioner:
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
                f"{shape}. Was it saved for another model, or with other options?"
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
    value = _plain(value)
    if not value.is_floating_point():
        return ""
    data = value.detach().double()
    if not bool(data.isfinite().all()):
        return "holds non-finite values"
    if key.startswith(SYMMETRIC_PREFIXES) and data.numel():
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


def _plain(value: Tensor) -> Tensor:
    # A DTensor's own shard: checking it needs no collective (every rank checks its part).
    return value.to_local() if hasattr(value, "to_local") and hasattr(value, "placements") else value


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
        matrices = snapshot.get("matrices")
        if shape is None or not isinstance(matrices, Tensor) or tuple(matrices.shape)[1:] != shape[1:]:
            raise ValueError(
                f"{where} has a refresh in flight of {spec.name}'s {factor!r} that does not match its state "
                f"(shape {tuple(matrices.shape) if isinstance(matrices, Tensor) else matrices!r}). Was it "
                "saved "
                "for another model?"
            )
        result = entry["result"]
        if load_values and result is not None:
            accepted = result.get("accepted")
            values = result.get("root", result.get("basis"))
            if not isinstance(accepted, Tensor) or not isinstance(values, Tensor):
                raise ValueError(f"{where} has a malformed refresh result of {spec.name}'s {factor!r}.")
            values, accepted = _plain(values), _plain(accepted)
            if not bool(values[accepted.bool()].isfinite().all()):
                raise ValueError(
                    f"Shampoo checkpoint is corrupt: an accepted refresh result of {spec.name} holds "
                    "non-finite "
                    "values. Refusing to load it (the optimizer is unchanged)."
                )


# ---------------------------------------------------------------------------------------- refreshes


def pending_entries(engine_state: dict[str, Any], where: str = "engine state") -> list[dict[str, Any]]:
    """The refresh engine's pending refreshes, one entry per snapshot (with its result, if computed)."""
    if not isinstance(engine_state, dict) or not isinstance(engine_state.get("pending", []), list):
        raise ValueError(f"{where}: the refreshes in flight are malformed ('engine': {{'pending': [...]}}).")
    entries = []
    for ticket in engine_state.get("pending", []):
        try:
            snapshots = list(ticket["snapshots"])
            results = ticket.get("results") or [None] * len(snapshots)
            step, install_step = int(ticket["step"]), int(ticket["install_step"])
            pairs = list(zip(snapshots, results, strict=True))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: a refresh in flight is malformed ({error!r}).") from error
        for snapshot, result in pairs:
            entries.append(
                {"step": step, "install_step": install_step, "snapshot": snapshot, "result": result}
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


def map_tensors(value: Any, fn: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor inside its dicts, lists and tuples."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(map_tensors(item, fn) for item in value)
    return value


# ---------------------------------------------------------------------------------------- ranks


def owned_part(state_dict: dict[str, Any], owned: Sequence[bool]) -> dict[str, Any]:
    """The part of a (validated) state dict that a rank keeps: its parameters and their refreshes."""
    if all(owned):
        return state_dict
    keys = [key for group in state_dict["param_groups"] for key in group["params"]]
    kept = {key for key, mine in zip(keys, owned, strict=True) if mine}
    extra = dict(state_dict.get("shampoo", {}))
    if "engine" in extra:
        entries = pending_entries(extra["engine"])
        extra["engine"] = pending_state([e for e in entries if owned[e["snapshot"]["param_index"]]])
    return {
        **state_dict,
        "state": {key: value for key, value in state_dict["state"].items() if key in kept},
        "shampoo": extra,
    }


def merge_state_dicts(parts: Sequence[dict[str, Any]], base: int) -> dict[str, Any]:
    """The complete state dict from the ranks' shares: the union of the per-parameter states and of the
    pending refreshes; the optimizer-wide counters are rank ``base``'s."""
    merged = dict(parts[base])
    merged["state"] = {key: value for part in parts for key, value in part["state"].items() if value}
    extra = {key: value for key, value in parts[base]["shampoo"].items() if key != "shard"}
    extra["engine"] = pending_state([e for part in parts for e in pending_entries(part["shampoo"]["engine"])])
    merged["shampoo"] = extra
    return merged
