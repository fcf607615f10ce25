"""Flop model of a Shampoo step, the lower bound the measured step times are held against.

The per-block counts are the optimizer's own cost model (:mod:`lightning_shampoo.cost`): statistics
``2·d·numel`` per preconditioned dim, each mode product another ``2·d·numel`` (one per step for root
inverse, two for eigenvalue corrected). Forward + backward of the model costs ``6·tokens·params``. Root
refreshes are not in the model (they are amortised over the frequency).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from lightning_shampoo import Shampoo
from lightning_shampoo.blocking import plan_for_group
from lightning_shampoo.cost import step_flops

BLOCKING = ("block_size", "max_preconditioned_dim", "precondition_1d", "max_factor_ratio")


def shampoo_step_flops(
    params: Iterable[Tensor], preconditioner: str = "root_inverse", **options: Any
) -> float:
    """Statistics + mode-product flops of one step, with Shampoo's blocking defaults unless ``options``
    override them."""
    defaults = inspect.signature(Shampoo).parameters
    group = {name: options.get(name, defaults[name].default) for name in BLOCKING}
    return sum(step_flops(plan_for_group(tuple(p.shape), group), preconditioner) for p in params)


def forward_backward_flops(params: Iterable[Tensor], tokens: int) -> int:
    """The usual ``6·tokens·params`` estimate of one forward + backward pass."""
    return 6 * tokens * sum(p.numel() for p in params)
