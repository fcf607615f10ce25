"""The recipes' warmup + cosine schedule against its formula, stepped through a real optimizer."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_shampoo.recipes import WarmupCosine


def expected(t: int, base: float, warmup: int, total: int, final: float) -> float:
    """The schedule written out step by step, independently of ``WarmupCosine.factor``."""
    if t < warmup:
        return base * (t + 1) / warmup
    if t >= total:
        return base * final
    cosine = (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2
    return base * (final + (1 - final) * cosine)


def rates(scheduler: WarmupCosine, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    """The rate each of ``steps`` optimizer steps uses, stepping the schedule after each as Lightning does."""
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


@pytest.mark.parametrize(("warmup", "total", "final"), [(3, 10, 0.1), (0, 6, 0.0), (5, 4, 0.2)])
def test_rates_follow_the_formula(warmup: int, total: int, final: float) -> None:
    optimizer = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.5)
    scheduler = WarmupCosine(optimizer, warmup_steps=warmup, total_steps=total, final_lr_ratio=final)
    used = rates(scheduler, optimizer, total + 3)
    formula = [expected(t, 0.5, warmup, total, final) for t in range(total + 3)]
    assert used == pytest.approx(formula, rel=1e-12)
    if warmup and total > warmup:
        assert max(used) == pytest.approx(0.5)  # the peak is the base rate, at the end of the warmup
    assert used[-1] == pytest.approx(0.5 * final)


def test_horizon_set_after_construction_as_the_recipe_modules_do() -> None:
    optimizer = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=1.0)
    scheduler = WarmupCosine(optimizer, warmup_steps=2)
    scheduler.set_total_steps(6)
    assert rates(scheduler, optimizer, 6) == pytest.approx([expected(t, 1.0, 2, 6, 0.1) for t in range(6)])


def test_a_decay_without_a_horizon_and_bad_arguments_say_what_to_do() -> None:
    optimizer = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=1.0)
    scheduler = WarmupCosine(optimizer, warmup_steps=1)
    rates(scheduler, optimizer, 1)  # to t = 1: the peak, still without a horizon
    with pytest.raises(RuntimeError, match="set_total_steps"):
        rates(scheduler, optimizer, 1)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        WarmupCosine(optimizer, warmup_steps=-1)
    with pytest.raises(ValueError, match=r"final_lr_ratio must be in \[0, 1\]"):
        WarmupCosine(optimizer, final_lr_ratio=2.0)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        WarmupCosine(optimizer, total_steps=0)


def test_a_resumed_schedule_continues_where_it_stopped() -> None:
    def fresh() -> tuple[torch.optim.Optimizer, WarmupCosine]:
        optimizer = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=1.0)
        return optimizer, WarmupCosine(optimizer, warmup_steps=3, total_steps=9)

    optimizer, scheduler = fresh()
    uninterrupted = rates(scheduler, optimizer, 9)
    optimizer, scheduler = fresh()
    first = rates(scheduler, optimizer, 4)
    saved = (optimizer.state_dict(), scheduler.state_dict())
    optimizer, scheduler = fresh()
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    assert first + rates(scheduler, optimizer, 5) == uninterrupted
