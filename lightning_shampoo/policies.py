"""Refresh policies: which optimizer steps refresh the preconditioners (steps count from 1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class RefreshPolicy:
    """Decides at which optimizer steps the preconditioners are refreshed (steps count from 1)."""

    def due(self, step: int) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class EveryNSteps(RefreshPolicy):
    """Refresh at steps ``t ≥ start`` with ``(t − start) % frequency == 0``."""

    start: int
    frequency: int

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.frequency == 0


@dataclass(frozen=True)
class OnRequest(RefreshPolicy):
    """Never due by itself: refreshes happen only when ``optimizer.request_refresh()`` is called."""

    def due(self, step: int) -> bool:
        return False


@dataclass(frozen=True)
class FunctionPolicy(RefreshPolicy):
    """Refresh at the steps where ``function(step)`` is true."""

    function: Callable[[int], bool]

    def due(self, step: int) -> bool:
        return bool(self.function(step))
