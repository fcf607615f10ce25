"""Learning-rate schedules of the recipes."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosine(LRScheduler):
    """Linear warmup, then a cosine decay to ``final_lr_ratio`` of the base rate; stepped per optimizer step.

    After ``t`` scheduler steps (``t = 0`` for the first optimizer step) the rate is ``η·m(t)``, with
    ``w = warmup_steps``, ``T = total_steps``, ``r = final_lr_ratio``:

    - ``m(t) = (t + 1) / w`` for ``t < w``,
    - ``m(t) = r + (1 − r)·(1 + cos(π·(t − w) / (T − w))) / 2`` for ``w ≤ t < T``,
    - ``m(t) = r`` for ``t ≥ max(w, T)`` (with ``T ≤ w`` there is no decay: warmup, then ``r``).

    A YAML recipe gives it as ``model.init_args.scheduler`` (``class_path`` / ``init_args``; the optimizer
    comes from the model). Without ``total_steps`` the recipe modules set it to the trainer's planned
    number of optimizer steps (``trainer.estimated_stepping_batches``), so ``--trainer.max_steps=N``
    shortens the whole schedule.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: steps of linear warmup (0: none).
        total_steps: the step at which the decay ends; None: set by the recipe module before training.
        final_lr_ratio: the rate from ``total_steps`` on, as a fraction of the base rate.
        last_epoch: the index of the last step taken (-1: start), as in torch's schedulers.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        final_lr_ratio: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= final_lr_ratio <= 1.0:
            raise ValueError(f"final_lr_ratio must be in [0, 1], got {final_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.final_lr_ratio = final_lr_ratio
        self.total_steps: int | None = None
        if total_steps is not None:
            self.set_total_steps(total_steps)
        super().__init__(optimizer, last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Sets the step at which the decay ends."""
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps

    def factor(self, t: int) -> float:
        """The multiplier ``m(t)`` of the base rate after ``t`` scheduler steps."""
        w, r = self.warmup_steps, self.final_lr_ratio
        if t < w:
            return (t + 1) / w
        if self.total_steps is None:
            if t == w:  # the peak (the first step without warmup): the decay has not begun, whatever T is
                return 1.0
            raise RuntimeError(
                "WarmupCosine needs total_steps after its warmup: give it in the recipe, or call "
                "set_total_steps before training (the recipe modules do, from the trainer)"
            )
        if t >= self.total_steps:
            return r
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * (t - w) / (self.total_steps - w)))

    def get_lr(self) -> list[float]:
        m = self.factor(self.last_epoch)
        return [base * m for base in self.base_lrs]
