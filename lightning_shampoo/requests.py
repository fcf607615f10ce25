"""What a refresh computes: the snapshot of a factor, the request made of it, and the batched computation.

A :class:`FactorSnapshot` is a copy of one factor stack ``(n, d, d)`` (or its triangles, :mod:`.triangles`:
then the roots come back as triangles too) with a request: an inverse root
(:class:`RootRequest`, :mod:`.roots`) or an eigenbasis (:class:`BasisRequest`, :mod:`.eigen`).
:func:`compute_refresh` stacks the snapshots of one size and request into one batched call. Snapshots and
results convert to plain dicts of tensors and values, so a checkpoint holding refreshes in flight loads
with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import cpu_pool, triangles
from .eigen import BasisResult, default_eigh_dtype, eigenbasis
from .roots import RootResult, inverse_pth_root


@dataclass(frozen=True)
class RootRequest:
    """Compute ``(S + εI)^(−1/p)``; ``ε`` relative to ``λmax(S)`` when ``relative_epsilon``; with
    ``pseudo_inverse`` eigenvalues at or below ``ε`` are dropped (inverted as 0) instead of lifted."""

    exponent: float
    epsilon: float
    relative_epsilon: bool
    pseudo_inverse: bool = False


@dataclass(frozen=True)
class BasisRequest:
    """Compute the eigenbasis of ``S`` (warm-started from the snapshot's ``previous`` basis, if any)."""


Request = RootRequest | BasisRequest
_REQUESTS: dict[str, type] = {"root": RootRequest, "basis": BasisRequest}


Result = RootResult | BasisResult
_RESULTS: dict[str, type] = {"root": RootResult, "basis": BasisResult}


@dataclass(frozen=True)
class FactorSnapshot:
    """A copy of one factor stack ``(n, d, d)`` (or packed) to refresh, what to compute from it, and where it
    goes.

    ``previous``: a copy of the installed eigenbases of the stack, to warm-start from (basis requests).
    ``matrices`` is ``None`` only in a refresh restored from a checkpoint that holds its results (a
    checkpoint need not keep the copy once the results exist).
    """

    param_index: int
    name: str
    matrices: Tensor | None
    request: Request
    previous: Tensor | None = None


@dataclass(frozen=True)
class RefreshSettings:
    """Optimizer-wide settings of the refresh computation: the inverse-root method and its acceptance
    bound, the precision of the eigendecompositions (float32 with a checked float64 fallback, float64,
    or None: the faster one where the matrices are, :func:`.eigen.default_eigh_dtype`), and how far a
    previous eigenbasis may drift before it is refined (see :mod:`.eigen`)."""

    inverse_root: str = "eigh"
    max_root_residual: float = 0.1
    eigh_dtype: torch.dtype | None = None
    basis_tolerance: float = 0.01


def compute_refresh(
    snapshots: list[FactorSnapshot], settings: RefreshSettings, workers: int = 1
) -> list[Result]:
    """The result of every snapshot; snapshots of one size and request are stacked into one batched call.

    With ``workers > 1`` (CPU matrices only), each stack is cut into up to ``workers`` pieces computed side
    by side on single-threaded helpers (:mod:`.cpu_pool`); otherwise inline, in the calling thread.
    """
    buckets: dict[tuple[tuple[int, ...], Request, bool], list[int]] = {}
    for index, snap in enumerate(snapshots):
        key = (tuple(snap.matrices.shape[1:]), snap.request, snap.previous is not None)
        buckets.setdefault(key, []).append(index)
    stacks = [_Stack.of(snapshots, members, request, warm) for (_, request, warm), members in buckets.items()]
    if workers > 1 and all(stack.matrices.device.type == "cpu" for stack in stacks):
        batches = _on_helpers(stacks, settings, workers)
    else:
        batches = [stack.compute(settings) for stack in stacks]
    results: list[Result | None] = [None] * len(snapshots)
    for stack, batch in zip(stacks, batches, strict=True):
        sizes = [snapshots[i].matrices.shape[0] for i in stack.members]
        split = [value.split(sizes) for value in fields_of(batch).values()]
        for i, *values in zip(stack.members, *split, strict=True):
            results[i] = type(batch)(*values)
    return results  # type: ignore[return-value]


@dataclass(eq=False)
class _Stack:
    """The snapshots ``members`` (same size, same request), stacked."""

    members: list[int]
    request: Request
    matrices: Tensor
    previous: Tensor | None

    @classmethod
    def of(cls, snapshots: list[FactorSnapshot], members: list[int], request: Request, warm: bool) -> _Stack:
        previous = torch.cat([snapshots[i].previous for i in members]) if warm else None
        return cls(members, request, torch.cat([snapshots[i].matrices for i in members]), previous)

    def cost(self, rows: slice) -> int:
        """About the flops of computing ``rows``: ``d³`` a matrix."""
        side = self.matrices.shape[-1]
        if triangles.is_packed(self.matrices):
            side = triangles.side_of(side)
        return len(range(*rows.indices(self.matrices.shape[0]))) * side**3

    def compute(self, settings: RefreshSettings, rows: slice = slice(None)) -> Result:
        previous = None if self.previous is None else self.previous[rows]
        return _compute_stack(self.matrices[rows], self.request, previous, settings)


def _on_helpers(stacks: list[_Stack], settings: RefreshSettings, workers: int) -> list[Result]:
    """Each stack's result, its rows cut into up to ``workers`` ranges computed on single-threaded helpers,
    costliest first (helpers take tasks in submission order)."""
    jobs = [(stack, rows) for stack in stacks for rows in _row_ranges(stack.matrices.shape[0], workers)]
    order = sorted(range(len(jobs)), key=lambda j: -jobs[j][0].cost(jobs[j][1]))
    tasks = [functools.partial(jobs[j][0].compute, settings, jobs[j][1]) for j in order]
    done = dict(zip(order, cpu_pool.run_single_threaded(tasks, workers), strict=True))
    return [_joined([done[j] for j, (owner, _) in enumerate(jobs) if owner is stack]) for stack in stacks]


def _row_ranges(count: int, workers: int) -> list[slice]:
    """``range(count)`` in up to ``workers`` consecutive slices of near-equal length."""
    bounds = [count * k // workers for k in range(workers + 1)]
    return [slice(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]


def _joined(parts: list[Result]) -> Result:
    """One result from the results of consecutive row ranges of a stack."""
    if len(parts) == 1:
        return parts[0]
    columns = zip(*(fields_of(part).values() for part in parts), strict=True)
    return type(parts[0])(*(torch.cat(column) for column in columns))


def _compute_stack(stacked: Tensor, request: Request, previous: Tensor | None,
                   settings: RefreshSettings) -> Result:
    """Roots or bases of one stack of same-size factors (full or packed) for one request."""
    packed = triangles.is_packed(stacked)  # then so are the roots computed from it
    stacked = triangles.full(stacked)
    eigh_dtype = settings.eigh_dtype or default_eigh_dtype(stacked.device)
    if isinstance(request, RootRequest):
        batch = inverse_pth_root(
            stacked,
            request.exponent,
            epsilon=request.epsilon,
            relative_epsilon=request.relative_epsilon,
            method=settings.inverse_root,
            max_residual=settings.max_root_residual,
            pseudo_inverse=request.pseudo_inverse,
            eigh_dtype=eigh_dtype,
        )
        return dataclasses.replace(batch, root=triangles.pack(batch.root)) if packed else batch
    # Keep a basis within tolerance, else decompose anew: on CPU a QR power step costs about as much as a
    # float32 eigh (measured), so refining a drifted basis saves nothing there.
    tolerance = settings.basis_tolerance
    return eigenbasis(stacked, previous, tolerance=tolerance, restart=tolerance, dtype=eigh_dtype)


def fields_of(result: Result) -> dict[str, Tensor]:
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}


def result_kind(result: Result) -> str:
    return "root" if isinstance(result, RootResult) else "basis"


def result_to_dict(result: Result) -> dict[str, Any]:
    """A result as tensors and plain values (a ``weights_only`` checkpoint loads it)."""
    return {"kind": result_kind(result), **fields_of(result)}


def result_from_dict(item: dict[str, Any]) -> Result:
    fields = {key: value for key, value in item.items() if key != "kind"}
    return _RESULTS[item.get("kind", "root")](**fields)


def snapshot_to_dict(snapshot: FactorSnapshot) -> dict[str, Any]:
    """A snapshot as tensors and plain values (a ``weights_only`` checkpoint loads it)."""
    request = snapshot.request
    item: dict[str, Any] = {
        "param_index": snapshot.param_index,
        "name": snapshot.name,
        "request": {
            "kind": "root" if isinstance(request, RootRequest) else "basis",
            **dataclasses.asdict(request),
        },
    }
    for key in ("matrices", "previous"):
        if getattr(snapshot, key) is not None:
            item[key] = getattr(snapshot, key)
    return item


def snapshot_from_dict(item: dict[str, Any]) -> FactorSnapshot:
    request = dict(item["request"])
    kind = request.pop("kind")
    return FactorSnapshot(
        param_index=int(item["param_index"]),
        name=str(item["name"]),
        matrices=item.get("matrices"),
        request=_REQUESTS[kind](**request),
        previous=item.get("previous"),
    )
