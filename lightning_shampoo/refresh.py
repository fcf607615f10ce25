"""Preconditioner refresh: snapshot → compute roots → install.

At a refresh step the optimizer hands the engine a :class:`FactorSnapshot` of every factor due; the
engine computes ``(S + εI)^(−1/p)`` for them, batched by size, and hands the results back for install
at ``step + lag``. Which steps refresh is decided by a :class:`RefreshPolicy`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .roots import RootResult, inverse_pth_root


@dataclass(frozen=True)
class FactorSnapshot:
    """A copy of one factor stack ``(n, d, d)`` to be rooted, and where its root goes."""

    param_index: int
    name: str
    matrices: Tensor
    exponent: int
    epsilon: float
    relative_epsilon: bool


@dataclass(frozen=True)
class RootSettings:
    """Optimizer-wide settings of the inverse-root computation."""

    method: str = "eigh"
    max_residual: float = 0.1


def compute_roots(snapshots: list[FactorSnapshot], settings: RootSettings) -> list[RootResult]:
    """Roots of every snapshot; snapshots of one size and exponent are stacked into one batched call."""
    buckets: dict[tuple[int, int, float, bool], list[int]] = {}
    for index, snap in enumerate(snapshots):
        key = (snap.matrices.shape[-1], snap.exponent, snap.epsilon, snap.relative_epsilon)
        buckets.setdefault(key, []).append(index)
    results: list[RootResult | None] = [None] * len(snapshots)
    for (_, exponent, epsilon, relative), members in buckets.items():
        stacked = torch.cat([snapshots[i].matrices for i in members])
        batch = inverse_pth_root(
            stacked,
            exponent,
            epsilon=epsilon,
            relative_epsilon=relative,
            method=settings.method,
            max_residual=settings.max_residual,
        )
        sizes = [snapshots[i].matrices.shape[0] for i in members]
        for i, root, residual, accepted in zip(
            members,
            batch.root.split(sizes),
            batch.residual.split(sizes),
            batch.accepted.split(sizes),
            strict=True,
        ):
            results[i] = RootResult(root=root, residual=residual, accepted=accepted)
    return results  # type: ignore[return-value]


class RefreshPolicy:
    """Decides at which optimizer steps the preconditioners are refreshed."""

    def due(self, step: int) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class EveryNSteps(RefreshPolicy):
    """Refresh at steps ``t ≥ start`` with ``(t − start) % frequency == 0``."""

    start: int
    frequency: int

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.frequency == 0


@dataclass
class _Ticket:
    step: int
    install_step: int
    snapshots: list[FactorSnapshot]
    results: list[RootResult] | None = None


@dataclass
class RefreshEngine:
    """Synchronous refresh: roots are computed inside ``step()`` and installed ``lag`` steps later.

    ``lag == 0`` is the classic behaviour; ``lag > 0`` is the reference trajectory of the asynchronous
    fixed-lag mode.
    """

    settings: RootSettings = field(default_factory=RootSettings)
    lag: int = 0
    _pending: deque[_Ticket] = field(default_factory=deque)

    def submit(self, step: int, snapshots: list[FactorSnapshot]) -> None:
        ticket = _Ticket(step, step + self.lag, snapshots)
        ticket.results = compute_roots(snapshots, self.settings)
        self._pending.append(ticket)

    def due(self, step: int) -> list[tuple[FactorSnapshot, RootResult]]:
        """Results whose install step has come, oldest first."""
        ready: list[tuple[FactorSnapshot, RootResult]] = []
        while self._pending and self._pending[0].install_step <= step:
            ticket = self._pending.popleft()
            assert ticket.results is not None
            ready.extend(zip(ticket.snapshots, ticket.results, strict=True))
        return ready

    def state_dict(self) -> dict[str, Any]:
        """Pending refreshes as their snapshots: a resumed run recomputes them (deterministically)."""
        return {
            "pending": [
                {
                    "step": t.step,
                    "install_step": t.install_step,
                    "snapshots": [_snapshot_to_dict(s) for s in t.snapshots],
                }
                for t in self._pending
            ]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending.clear()
        for item in state.get("pending", []):
            snapshots = [FactorSnapshot(**s) for s in item["snapshots"]]
            ticket = _Ticket(item["step"], item["install_step"], snapshots)
            ticket.results = compute_roots(snapshots, self.settings)
            self._pending.append(ticket)

    def close(self) -> None:
        self._pending.clear()


def _snapshot_to_dict(snapshot: FactorSnapshot) -> dict[str, Any]:
    return {
        "param_index": snapshot.param_index,
        "name": snapshot.name,
        "matrices": snapshot.matrices,
        "exponent": snapshot.exponent,
        "epsilon": snapshot.epsilon,
        "relative_epsilon": snapshot.relative_epsilon,
    }
