"""The cost model of a Shampoo step: flops per block, the one count every balance and bound uses.

Per block of ``numel`` entries and each preconditioned dim ``d``: the statistics ``G₍ᵢ₎G₍ᵢ₎ᵀ`` cost
``2·d·numel`` flops and a mode product ``Pᵢ X₍ᵢ₎`` another ``2·d·numel``. A root-inverse step takes one
mode product per dim (the preconditioning), an eigenvalue-corrected step two (into the eigenbasis and
back). A refresh costs about ``REFRESH_FLOPS·d³`` per factor (eigendecomposition and products), and the
elementwise phases (moments, graft, update) about ``ELEMENTWISE_FLOPS`` per element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .blocking import BlockGroup, BlockPlan

REFRESH_FLOPS = 10.0
ELEMENTWISE_FLOPS = 10.0
# Mode products per preconditioned dim and step, by preconditioner.
MODE_PRODUCTS = {"root_inverse": 1, "eigenvalue_corrected": 2}


def step_flops(plan: BlockPlan, preconditioner: str = "root_inverse") -> float:
    """Matmul flops of one step: statistics plus mode products, ``Σ_blocks Σ_i 2·(1 + m)·d_i·numel``."""
    return sum(group.n_blocks * _block_step(group, preconditioner) for group in plan.groups)


def refresh_flops(plan: BlockPlan) -> float:
    """Flops of one refresh of every factor of the plan, ``REFRESH_FLOPS·Σ d³``."""
    return sum(group.n_blocks * _block_refresh(group) for group in plan.groups)


def parameter_cost(
    plan: BlockPlan, precondition_frequency: int, preconditioner: str = "root_inverse"
) -> float:
    """Average flops per step of one parameter: elementwise work, matmuls and amortised refreshes."""
    elementwise = ELEMENTWISE_FLOPS * math.prod(plan.param_shape)
    return elementwise + step_flops(plan, preconditioner) + refresh_flops(plan) / precondition_frequency


def block_costs(
    plan: BlockPlan, precondition_frequency: int, preconditioner: str = "root_inverse"
) -> tuple[float, ...]:
    """:func:`parameter_cost` per block, in the plan's block order (group by group, each group's blocks in
    stack order); a parameter without preconditioned blocks is one unit of elementwise work."""
    if not plan.groups:
        return (ELEMENTWISE_FLOPS * math.prod(plan.param_shape),)
    costs: list[float] = []
    for group in plan.groups:
        elementwise = ELEMENTWISE_FLOPS * math.prod(group.block_shape)
        refresh = _block_refresh(group) / precondition_frequency
        costs += [elementwise + _block_step(group, preconditioner) + refresh] * group.n_blocks
    return tuple(costs)


@dataclass(frozen=True)
class Work:
    """What a parameter costs per step: its blocks (``plan``), in total and block by block."""

    plan: BlockPlan
    total: float
    blocks: tuple[float, ...]


def parameter_work(
    plan: BlockPlan, precondition_frequency: int, preconditioner: str = "root_inverse"
) -> Work:
    """:func:`parameter_cost` and :func:`block_costs` of ``plan``."""
    return Work(
        plan,
        parameter_cost(plan, precondition_frequency, preconditioner),
        block_costs(plan, precondition_frequency, preconditioner),
    )


def _block_step(group: BlockGroup, preconditioner: str) -> float:
    per_dim = 2.0 * (1 + MODE_PRODUCTS[preconditioner])
    return per_dim * math.prod(group.block_shape) * sum(_dims(group.block_shape, group.preconditioned))


def _block_refresh(group: BlockGroup) -> float:
    return REFRESH_FLOPS * sum(d**3 for d in _dims(group.block_shape, group.preconditioned))


def _dims(block_shape: tuple[int, ...], preconditioned: tuple[bool, ...]) -> list[int]:
    return [size for size, keep in zip(block_shape, preconditioned, strict=True) if keep]
