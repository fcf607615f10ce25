"""The learning-rate schedule every convergence run trains with: linear warmup, then cosine decay.

For peak learning rate η, warmup ``w`` steps and horizon ``T`` steps, optimizer step ``t = 1, 2, …``
uses ``η·f(t)``:

- ``f(t) = t / w`` for ``t ≤ w`` (linear warmup, reaching the peak at step ``w``),
- ``f(t) = m + (1 − m)·½·(1 + cos(π·(t − w)/(T − w)))`` for ``w < t ≤ T`` (cosine from the peak down
  to ``m·η`` at step ``T``),
- ``f(t) = m`` after ``T``.

The floor ``m`` is 10% of the peak, as in common LM recipes (Chinchilla, LLaMA), rather than 0: a
convergence run is judged at its first evaluation under a target loss, usually well before ``T``, so
the schedule's tail matters little; a floor keeps the last steps of a run that has not yet got there
from stalling on a vanishing learning rate. Warmup is 5% of the horizon: long enough that neither
optimizer's first steps (Adam's and the graft's second moments from a handful of gradients) take a
peak-sized step, short enough that it decides little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

WARMUP_FRACTION = 0.05  # of the horizon
FINAL_FRACTION = 0.1  # of the peak, at the horizon


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup over ``warmup_steps`` then cosine to ``final_fraction``·peak at ``total_steps``."""

    warmup_steps: int
    total_steps: int
    final_fraction: float = FINAL_FRACTION

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {self.warmup_steps} and "
                             f"{self.total_steps}")
        if not 0.0 <= self.final_fraction <= 1.0:
            raise ValueError(f"final_fraction is a share of the peak in [0, 1], got {self.final_fraction}")

    def factor(self, step: int) -> float:
        """``f(step)``: the multiple of the peak learning rate that optimizer step ``step`` (from 1) uses."""
        if step < 1:
            raise ValueError(f"optimizer steps count from 1, got {step}")
        if step <= self.warmup_steps:
            return step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final_fraction + (1.0 - self.final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def attach(self, optimizer: Optimizer) -> LambdaLR:
        """A scheduler setting every group's ``lr`` to its initial lr × ``f(t)`` before step ``t``; call its
        ``step()`` after each ``optimizer.step()``. Works for any torch optimizer that reads
        ``group["lr"]`` at each step (Shampoo does)."""
        # LambdaLR applies its lambda to the number of scheduler steps taken so far: t − 1 before step t.
        return LambdaLR(optimizer, lambda done: self.factor(done + 1))


def warmup_cosine(total_steps: int) -> WarmupCosine:
    """The benchmarks' schedule over ``total_steps``: warmup :data:`WARMUP_FRACTION` of it (at least one
    step), cosine to :data:`FINAL_FRACTION` of the peak."""
    return WarmupCosine(max(1, round(WARMUP_FRACTION * total_steps)), total_steps)
