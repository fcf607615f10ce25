"""Grafting: the step size of a diagonal method, the direction of Shampoo.

The diagonal method's update ``A`` is computed elementwise on the whole parameter; per block the Shampoo
direction ``D`` is rescaled to ``A``'s norm, ``U = D·‖A‖/‖D‖`` (``U = 0`` where ``‖D‖ = 0``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Graft = Literal["adam", "adagrad", "rmsprop", "sgd", "none"]
GRAFTS: tuple[str, ...] = ("adam", "adagrad", "rmsprop", "sgd", "none")


def has_second_moment(graft: str) -> bool:
    return graft in ("adam", "adagrad", "rmsprop")


def update_second_moment(graft: str, second_moment: Tensor, grad: Tensor, beta2: float) -> None:
    """In place: ``v ← β·v + (1−β)·G²`` (adam, rmsprop) or ``v ← v + G²`` (adagrad)."""
    if graft == "adagrad":
        second_moment.addcmul_(grad, grad)
    else:
        second_moment.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def diagonal_update(
    graft: str, momentum_hat: Tensor, second_moment: Tensor | None, step: int, beta2: float, epsilon: float
) -> Tensor:
    """The diagonal method's update ``A``.

    adam: ``M̂ / (√(v / (1−β^t)) + ε)``; adagrad and rmsprop: ``M̂ / (√v + ε)``; sgd and none: ``M̂``.
    """
    if second_moment is None:
        return momentum_hat
    if graft == "adam":
        denom = (second_moment / (1.0 - beta2**step)).sqrt_()
    else:
        denom = second_moment.sqrt()
    return momentum_hat / denom.add_(epsilon)


def graft_norm(direction: Tensor, diagonal: Tensor) -> Tensor:
    """Per block of a stack ``(n, …)``: ``U = D·‖A‖/‖D‖``, with ``U = 0`` where ``‖D‖ = 0``."""
    d_norm = torch.linalg.vector_norm(direction.flatten(1), dim=1)
    a_norm = torch.linalg.vector_norm(diagonal.flatten(1), dim=1)
    scale = torch.where(d_norm > 0, a_norm / d_norm, torch.zeros_like(d_norm))
    return direction * scale.view(-1, *([1] * (direction.dim() - 1)))
