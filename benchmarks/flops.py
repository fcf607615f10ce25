"""Flop model of a Shampoo step, the lower bound the measured step times are held against.

Per block of ``numel`` entries and each preconditioned dim ``d_i``: the statistics
``G₍ᵢ₎G₍ᵢ₎ᵀ`` cost ``2·d_i·numel`` flops and the mode product ``Pᵢ X₍ᵢ₎`` another ``2·d_i·numel``;
for a 2-D ``m×n`` block that is ``4·m·n·(m+n)``. Forward + backward of the model costs
``6·tokens·params``. Root refreshes are not in the model (they are amortised over the frequency).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import Tensor

from lightning_shampoo.blocking import plan_blocks


def shampoo_step_flops(
    params: Iterable[Tensor],
    block_size: int = 1024,
    max_preconditioned_dim: int | None = None,
    precondition_1d: bool = True,
) -> int:
    """Statistics + preconditioning flops of one step: Σ_blocks Σ_i 4·d_i·numel(block)."""
    total = 0
    for param in params:
        plan = plan_blocks(param.shape, block_size, max_preconditioned_dim, precondition_1d)
        for group in plan.groups:
            numel = math.prod(group.block_shape)
            dims = sum(d for d, keep in zip(group.block_shape, group.preconditioned, strict=True) if keep)
            total += group.n_blocks * 4 * dims * numel
    return total


def forward_backward_flops(params: Iterable[Tensor], tokens: int) -> int:
    """The usual ``6·tokens·params`` estimate of one forward + backward pass."""
    return 6 * tokens * sum(p.numel() for p in params)
