"""Grafting: the step size of a diagonal method, the direction of Shampoo.

The diagonal method's update ``A`` is computed elementwise on the whole parameter; per block the Shampoo
direction ``D`` is rescaled to ``A``'s norm, ``U = D·‖A‖/‖D‖`` (``U = 0`` where ``‖D‖ = 0``). The
elementwise functions take the lists of a parameter group and run as ``torch._foreach`` ops: one call
per phase for all parameters, instead of one per parameter.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Graft = Literal["adam", "adagrad", "rmsprop", "sgd", "none"]
GRAFTS: tuple[str, ...] = ("adam", "adagrad", "rmsprop", "sgd", "none")


def has_second_moment(graft: str) -> bool:
    return graft in ("adam", "adagrad", "rmsprop")


def update_second_moments(
    graft: str, second_moments: list[Tensor], grads: list[Tensor], beta2: float
) -> None:
    """In place, for every parameter: ``v ← β·v + (1−β)·G²`` (adam, rmsprop) or ``v ← v + G²`` (adagrad)."""
    if graft == "adagrad":
        torch._foreach_addcmul_(second_moments, grads, grads)
    else:
        torch._foreach_mul_(second_moments, beta2)
        torch._foreach_addcmul_(second_moments, grads, grads, value=1.0 - beta2)


def diagonal_updates(
    graft: str,
    momenta_hat: list[Tensor],
    second_moments: list[Tensor] | None,
    steps: list[int],
    beta2: float,
    epsilon: float,
) -> list[Tensor]:
    """The diagonal method's update ``A`` of every parameter (``steps``: each one's step count ``t``).

    adam: ``M̂ / (√(v / (1−β^t)) + ε)``; adagrad and rmsprop: ``M̂ / (√v + ε)``; sgd and none: ``M̂``.
    """
    if second_moments is None:
        return momenta_hat
    if graft == "adam":
        denominators = torch._foreach_div(second_moments, [1.0 - beta2**step for step in steps])
        torch._foreach_sqrt_(denominators)
    else:
        denominators = torch._foreach_sqrt(second_moments)
    torch._foreach_add_(denominators, epsilon)
    return torch._foreach_div(momenta_hat, denominators)


def graft_norms(directions: list[Tensor], diagonals: list[Tensor]) -> list[Tensor]:
    """Per block of every stack ``(n, …)``: ``U = D·‖A‖/‖D‖``, with ``U = 0`` where ``‖D‖ = 0``.

    ``diagonals[j]`` is ``A`` split like ``directions[j]``. Norms take one reduction per stack.
    """
    d_norm, a_norm = _block_norms(directions), _block_norms(diagonals)
    scales = torch.where(d_norm > 0, a_norm / d_norm, torch.zeros_like(d_norm))
    per_stack = scales.split([stack.shape[0] for stack in directions])
    broadcastable = [
        scale.view(-1, *([1] * (stack.dim() - 1))) for stack, scale in zip(directions, per_stack, strict=True)
    ]
    return torch._foreach_mul(directions, broadcastable)


def _block_norms(stacks: list[Tensor]) -> Tensor:
    """``‖block‖`` of every block of every stack, in order: one reduction per stack (cheaper than a foreach
    over the blocks, which loops over them one by one on CPU)."""
    flat = [stack.flatten(1) if stack.dim() > 1 else stack[:, None] for stack in stacks]  # (n, block numel)
    return torch.cat([torch.linalg.vector_norm(blocks, dim=1) for blocks in flat])
