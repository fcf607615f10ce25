"""The graft's batched (foreach) functions against their formulas written out per tensor, in fp64."""

from __future__ import annotations

import pytest
import torch

from lightning_shampoo import grafting

SHAPES = [(4, 3), (5,), (2, 3, 2)]


def _tensors(seed: int, positive: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in SHAPES]
    return [t.abs() + 0.1 for t in tensors] if positive else tensors


@pytest.mark.parametrize("graft", ["adam", "rmsprop", "adagrad"])
def test_second_moments_follow_the_ema_or_the_sum(graft):
    moments, grads = _tensors(0, positive=True), _tensors(1)
    expected = [v + g * g if graft == "adagrad" else 0.9 * v + 0.1 * g * g for v, g in zip(moments, grads)]
    grafting.update_second_moments(graft, moments, grads, beta2=0.9)
    for got, want in zip(moments, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("graft", ["adam", "rmsprop", "adagrad", "sgd", "none"])
def test_diagonal_updates_per_parameter_step(graft):
    momenta, moments = _tensors(2), _tensors(3, positive=True)
    steps = [1, 4, 9]  # a parameter whose steps were skipped has its own bias correction
    second = moments if grafting.has_second_moment(graft) else None
    got = grafting.diagonal_updates(graft, momenta, second, steps, beta2=0.99, epsilon=1e-3)
    for m, v, t, update in zip(momenta, moments, steps, got, strict=True):
        if graft == "adam":
            want = m / ((v / (1 - 0.99**t)).sqrt() + 1e-3)
        elif graft in ("rmsprop", "adagrad"):
            want = m / (v.sqrt() + 1e-3)
        else:
            want = m
        torch.testing.assert_close(update, want)


def test_graft_norms_rescale_every_block_to_the_diagonal_norm():
    gen = torch.Generator().manual_seed(4)
    directions = [torch.randn(3, 4, 2, generator=gen, dtype=torch.float64),
                  torch.randn(1, 5, generator=gen, dtype=torch.float64)]
    directions[0][1] = 0.0  # a zero direction grafts to a zero update, not NaN
    diagonals = [torch.randn(d.shape, generator=gen, dtype=torch.float64) for d in directions]
    got = grafting.graft_norms(directions, diagonals)
    for stack, diagonal, update in zip(directions, diagonals, got, strict=True):
        for block, a, u in zip(stack, diagonal, update, strict=True):
            if block.norm() == 0:
                assert torch.equal(u, torch.zeros_like(u))
            else:
                torch.testing.assert_close(u, block * a.norm() / block.norm())
                torch.testing.assert_close(u.norm(), a.norm())
