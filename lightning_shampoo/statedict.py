"""Shampoo's state dict: what it holds, its two forms and how ranks merge their shares.

One content, two forms:

* **Saved** (``Shampoo.state_dict()``): torch's ``{"state", "param_groups"}``, keyed by parameter (never by
  rank). Every parameter's state has a reserved entry ``"shampoo"``: the optimizer-wide clock (the same in
  every parameter), the counters of ``metrics()`` and that parameter's refreshes in flight. The form is
  made for ``torch.distributed.checkpoint``'s ``get_state_dict`` / ``set_state_dict``, which keep only
  per-parameter entries (with ``flatten_optimizer_state_dict``: tensor, int, float and dict leaves under
  the keys the live state has), and for ``dcp.load``, which fills a *fresh* optimizer's state dict and so
  reads only the entries that one has. Hence every parameter has a fixed number of refresh slots
  (:func:`slot_count`, the refreshes in flight at once under the default schedule), an empty one zeros with
  ``install_step`` 0; more refreshes in flight get extra slots, which only loaders that pass the saved dict
  itself keep (a load that lost some warns). A slot holds a refresh's results once computed, else its
  snapshot: the keys are the same either way. What differs between ranks (FSDP2 shards: the counters,
  whether a refresh is computed yet) is kept in tensors, per block or per rank, since a plain value
  reaches every rank as one rank's (DCP saves it once).
* **Sectioned** (:func:`unpack`): per-parameter state without the entry, and a top-level ``"shampoo"``
  section with the clock, the counters, the preconditioner kind and the engine's refreshes in flight
  (``"engine"``). Earlier versions saved this form and it still loads; validation, the ranks' merge and
  cut (``Layout.gather`` / ``keep``) and :mod:`lightning_shampoo.checkpoint` work on it.

How a saved dict is checked and loaded is in :mod:`.loading`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .options import RefreshOptions
from .requests import RootRequest

# Per-block state keys (stacks of matrices) by prefix, and what their values must satisfy.
SYMMETRIC_PREFIXES = ("factor_", "root_")
ORTHONORMAL_PREFIXES = ("basis_",)
BLOCK_PREFIXES = SYMMETRIC_PREFIXES + ORTHONORMAL_PREFIXES
NONNEGATIVE_KEYS = ("graft_sq", "exp_avg_sq")
# Relative tolerances of the value checks: far above fp32 (and bf16) rounding, far below a corrupted entry.
SYMMETRY_TOLERANCE = 1e-2
ORTHONORMALITY_TOLERANCE = 5e-2


# The reserved entry of every parameter's saved state (see the module doc).
SECTION = "shampoo"
# A slot's fields besides the matrices, by result kind: the results' per-block checks.
RESULT_VECTORS = {
    "root": {"residual": torch.float64, "accepted": torch.bool},
    "basis": {"residual": torch.float64, "accepted": torch.bool, "full": torch.bool, "kept": torch.bool},
}
EMPTY_REQUESTS = {"root": dataclasses.asdict(RootRequest(0.0, 0.0, False, False)), "basis": {}}

COUNTERS = ("nonfinite_skips", "refreshes", "roots_accepted", "roots_rejected", "rejected_refreshes")


@dataclass
class Progress:
    """The optimizer-wide clock and counters: the refresh schedule runs on ``step``; saved in every
    parameter's reserved entry (``state_dict()["state"][p]["shampoo"]``) and reported by ``metrics()``."""

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

    def rank_row(self, like: Tensor) -> Tensor:
        """The counters and the largest residual as a ``(1, 6)`` row on ``like``'s device: figures of this
        rank alone, kept per rank in a tensor (a plain value would reach every rank as one rank's)."""
        row = [*(self.counters.get(name, 0) for name in COUNTERS), self.max_root_residual]
        return torch.tensor([row], dtype=torch.float64, device=like.device)

    @staticmethod
    def from_row(row: Tensor) -> dict[str, Any]:
        """Inverse of :meth:`rank_row` (this rank's row of a saved one), as ``to_dict`` entries."""
        values = plain(row).reshape(-1).tolist()
        counters = dict(zip(COUNTERS, map(int, values), strict=False))
        return {"counters": counters, "max_root_residual": values[len(COUNTERS)]}


def plain(value: Tensor) -> Tensor:
    # A DTensor's own shard: checking it needs no collective (every rank checks its part).
    return value.to_local() if hasattr(value, "to_local") and hasattr(value, "placements") else value


def is_block_key(key: str) -> bool:
    return key.startswith(BLOCK_PREFIXES)


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


def slot_count(refresh: RefreshOptions) -> int:
    """Refresh slots of every parameter's saved state: the refreshes in flight at once under the default
    schedule (one every ``frequency`` steps, each ``lag`` steps to its install)."""
    return -(-refresh.lag // refresh.frequency)


# ---------------------------------------------------------------------------------------- the saved form


Export = Callable[..., Tensor]  # (parameter index, local tensor, *, per_block) -> as saved


def sectioned(
    torch_state: dict[str, Any],
    progress: Progress,
    engine_state: dict[str, Any],
    preconditioner: str,
    shard: dict[str, Any] | None,
) -> dict[str, Any]:
    """The sectioned form of torch's ``Optimizer.state_dict()`` (live local tensors, in new dicts), with the
    clock and the engine's refreshes in flight; ``shard`` marks one rank's share."""
    extra = {"preconditioner": preconditioner, **progress.to_dict(), "engine": engine_state}
    if shard is not None:
        extra["shard"] = shard
    state = {key: _without_section(values) for key, values in torch_state["state"].items()}
    return {**torch_state, "state": state, "shampoo": extra}


def pack(sectioned: dict[str, Any], *, matrix: str, slots: int, export: Export) -> dict[str, Any]:
    """The saved form of a sectioned state dict whose tensors are local (``export`` turns them into saved
    ones; where the state was gathered from ranks they are plain). ``matrix``: ``"root"`` or ``"basis"``,
    what refreshes compute. A share's ``"shard"`` mark goes to the top level."""
    extra = sectioned.get("shampoo", {})
    tickets: dict[int, dict[tuple[int, int], dict[str, dict[str, Any]]]] = {}
    for entry in pending_entries(extra.get("engine", {})):
        snapshot = entry["snapshot"]
        ticket = tickets.setdefault(snapshot["param_index"], {})
        ticket.setdefault((entry["step"], entry["install_step"]), {})[snapshot["name"]] = entry
    clock = Progress.from_dict(extra)
    state = {}
    for index, key in enumerate(_param_keys(sectioned)):
        values = sectioned["state"].get(key)
        if values:
            mine = sorted(tickets.get(index, {}).items())
            state[key] = _pack_param(values, mine, clock, matrix, slots, functools.partial(export, index))
    packed = {key: value for key, value in sectioned.items() if key != "shampoo"}
    packed["state"] = state
    if "shard" in extra:
        packed["shard"] = extra["shard"]
    return packed


def _pack_param(
    values: dict[str, Any],
    mine: list[tuple[tuple[int, int], dict[str, dict[str, Any]]]],
    clock: Progress,
    matrix: str,
    slots: int,
    export: Callable[..., Tensor],
) -> dict[str, Any]:
    """One parameter's saved state: its tensors as saved, and its entry with the clock and refreshes."""
    saved = export_state(values, export)
    factors = {name[len("factor_") :]: value for name, value in values.items() if name.startswith("factor_")}
    refreshes = {
        str(number): _slot(step, install_step, entries, matrix, export)
        for number, ((step, install_step), entries) in enumerate(mine)
    }
    for number in range(len(mine), slots if factors else 0):
        refreshes[str(number)] = _empty_slot(factors, matrix, export)
    like = next(value for value in values.values() if isinstance(value, Tensor))
    section = {"step": clock.step, "refresh_requested": clock.refresh_requested}
    section["metrics"] = export(clock.rank_row(like), per_block=True)
    return {**saved, SECTION: {**section, "in_flight": len(mine), "refreshes": refreshes}}


def export_state(values: dict[str, Any], export: Callable[..., Tensor]) -> dict[str, Any]:
    """A parameter's live state as saved, without the reserved entry (``export(value, per_block=…)``)."""
    return {
        name: export(value, per_block=is_block_key(name)) if isinstance(value, Tensor) else value
        for name, value in values.items()
        if name != SECTION
    }


def _slot(
    step: int, install_step: int, entries: dict[str, dict[str, Any]], matrix: str, export: Callable
) -> dict[str, Any]:
    """One refresh of one parameter: per factor its results once computed (else its snapshot)."""
    computed = all(entry["result"] is not None for entry in entries.values())
    slot: dict[str, Any] = {"step": step, "install_step": install_step}
    for name, entry in entries.items():
        snapshot, result = entry["snapshot"], entry["result"]
        matrices = result[matrix] if computed else snapshot["matrices"]
        previous = snapshot.get("previous")
        vectors = {
            field: result[field] if computed else matrices.new_zeros(matrices.shape[0], dtype=dtype)
            for field, dtype in RESULT_VECTORS[matrix].items()
        }
        # Per block, as a tensor: ranks differ, and a plain value would be one rank's for all (DCP).
        vectors["computed"] = torch.full((matrices.shape[0],), computed, device=matrices.device)
        request = {key: value for key, value in snapshot["request"].items() if key != "kind"}
        slot[name] = _slot_fields(matrices, previous, vectors, request, matrix, export)
    return slot


def _empty_slot(factors: dict[str, Tensor], matrix: str, export: Callable) -> dict[str, Any]:
    slot: dict[str, Any] = {"step": 0, "install_step": 0}
    for name, factor in factors.items():
        vectors = {
            field: factor.new_zeros(factor.shape[0], dtype=dtype)
            for field, dtype in {**RESULT_VECTORS[matrix], "computed": torch.bool}.items()
        }
        slot[name] = _slot_fields(
            torch.zeros_like(factor), None, vectors, EMPTY_REQUESTS[matrix], matrix, export
        )
    return slot


def _slot_fields(
    matrices: Tensor,
    previous: Tensor | None,
    vectors: dict[str, Tensor],
    request: dict[str, Any],
    matrix: str,
    export: Callable,
) -> dict[str, Any]:
    fields = {
        "matrices": export(matrices, per_block=True),
        **{key: export(value, per_block=True) for key, value in vectors.items()},
    }
    if matrix == "basis":  # the warm start of a basis refresh not computed yet
        warm = previous if previous is not None else torch.zeros_like(matrices)
        fields["previous"] = export(warm, per_block=True)
    if request:  # an empty dict would not survive flattening
        fields["request"] = dict(request)
    return fields


def unpack(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The sectioned form of a saved state dict (a sectioned one, with its top-level ``"shampoo"`` section,
    is returned as it is).

    Raises ``ValueError`` for a malformed reserved entry; the rest is :func:`validate`'s to check.
    """
    state = state_dict.get("state")
    if "shampoo" in state_dict or not isinstance(state, dict):
        return state_dict
    try:
        keys = _param_keys(state_dict)
    except (KeyError, TypeError):
        return state_dict  # validate() says what is wrong
    extra: dict[str, Any] = {}
    entries: list[dict[str, Any]] = []
    lost: list[int] = []  # per parameter: refreshes in flight saved but not in this dict
    for index, key in enumerate(keys):
        section = state.get(key, {}).get(SECTION) if isinstance(state.get(key), dict) else None
        if section is None:
            continue
        where = f"Shampoo checkpoint's entry {SECTION!r} of parameter {key!r}"
        try:
            clock = {name: section[name] for name in ("step", "refresh_requested") if name in section}
            clock.update(Progress.from_row(section["metrics"]) if "metrics" in section else {})
            if not extra:
                extra.update(clock)
            elif clock.get("step") != extra.get("step"):
                raise ValueError(
                    f"{where} is at step {clock.get('step')!r}, another parameter's at "
                    f"{extra.get('step')!r}: the state dict mixes checkpoints. Pass one state_dict()."
                )
            filled = [slot for slot in section.get("refreshes", {}).values() if slot["install_step"]]
            lost.append(max(int(section.get("in_flight", len(filled))) - len(filled), 0))
            for slot in filled:
                entries.extend(_slot_entries(index, slot))
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{where} is malformed ({error!r}). Pass optimizer.state_dict().") from error
    plain = {key: _without_section(values) for key, values in state.items()}
    kinds = {"basis_": "eigenvalue_corrected", "root_": "root_inverse"}
    found = {kind for values in plain.values() if isinstance(values, dict) for name in values
             for prefix, kind in kinds.items() if str(name).startswith(prefix)}  # fmt: skip
    extra["preconditioner"] = found.pop() if len(found) == 1 else None
    extra["engine"] = pending_state(entries)
    if "shard" in state_dict:
        extra["shard"] = state_dict["shard"]
    if any(lost):
        extra["lost_in_flight"] = (max(lost), sum(map(bool, lost)))
    rest = {key: value for key, value in state_dict.items() if key != "shard"}
    return {**rest, "state": plain, "shampoo": extra}


def _slot_entries(index: int, slot: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The engine's entries (one per factor) of a filled slot."""
    for name, fields in slot.items():
        if not isinstance(fields, dict):
            continue
        computed = bool(plain(fields["computed"]).all())
        kind = "basis" if "full" in fields else "root"
        snapshot: dict[str, Any] = {
            "param_index": index,
            "name": name,
            "request": {"kind": kind, **fields.get("request", {})},
        }
        if "previous" in fields:
            snapshot["previous"] = fields["previous"]
        result = None
        if computed:
            result = {"kind": kind, kind: fields["matrices"], **{f: fields[f] for f in RESULT_VECTORS[kind]}}
        else:
            snapshot["matrices"] = fields["matrices"]
        yield {
            "step": int(slot["step"]),
            "install_step": int(slot["install_step"]),
            "snapshot": snapshot,
            "result": result,
        }


def _without_section(values: Any) -> Any:
    return (
        {name: value for name, value in values.items() if name != SECTION}
        if isinstance(values, dict)
        else values
    )


def _param_keys(state_dict: dict[str, Any]) -> list[Any]:
    return [key for group in state_dict["param_groups"] for key in group["params"]]


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
    """The part of a (validated, sectioned) state dict that a rank keeps: its parameters and refreshes."""
    if all(owned):
        return state_dict
    keys = _param_keys(state_dict)
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
    """The complete (sectioned) state dict from the ranks' shares: the union of the per-parameter states and
    of the pending refreshes; the optimizer-wide counters are rank ``base``'s."""
    merged = dict(parts[base])
    merged["state"] = {key: value for part in parts for key, value in part["state"].items() if value}
    extra = {key: value for key, value in parts[base]["shampoo"].items() if key != "shard"}
    extra["engine"] = pending_state([e for part in parts for e in pending_entries(part["shampoo"]["engine"])])
    merged["shampoo"] = extra
    return merged
