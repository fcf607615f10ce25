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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import triangles
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


def compute_refresh(snapshots: list[FactorSnapshot], settings: RefreshSettings) -> list[Result]:
    """The result of every snapshot; snapshots of one size and request are stacked into one batched call."""
    buckets: dict[tuple[tuple[int, ...], Request, bool], list[int]] = {}
    for index, snap in enumerate(snapshots):
        key = (tuple(snap.matrices.shape[1:]), snap.request, snap.previous is not None)
        buckets.setdefault(key, []).append(index)
    results: list[Result | None] = [None] * len(snapshots)
    for (_, request, warm), members in buckets.items():
        stacked = torch.cat([snapshots[i].matrices for i in members])
        packed = triangles.is_packed(stacked)  # then so are the roots computed from it
        stacked = triangles.full(stacked)
        eigh_dtype = settings.eigh_dtype or default_eigh_dtype(stacked.device)
        if isinstance(request, RootRequest):
            batch: Result = inverse_pth_root(
                stacked,
                request.exponent,
                epsilon=request.epsilon,
                relative_epsilon=request.relative_epsilon,
                method=settings.inverse_root,
                max_residual=settings.max_root_residual,
                pseudo_inverse=request.pseudo_inverse,
                eigh_dtype=eigh_dtype,
            )
            if packed:
                batch = dataclasses.replace(batch, root=triangles.pack(batch.root))
        else:
            previous = torch.cat([snapshots[i].previous for i in members]) if warm else None
            # Keep a basis within tolerance, else decompose anew: on CPU a QR power step costs about as much
            # as a float32 eigh (measured), so refining a drifted basis saves nothing there.
            tolerance = settings.basis_tolerance
            batch = eigenbasis(
                stacked, previous, tolerance=tolerance, restart=tolerance, dtype=eigh_dtype
            )
        sizes = [snapshots[i].matrices.shape[0] for i in members]
        parts = [value.split(sizes) for value in fields_of(batch).values()]
        for i, *values in zip(members, *parts, strict=True):
            results[i] = type(batch)(*values)
    return results  # type: ignore[return-value]


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
