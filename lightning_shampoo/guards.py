"""What keeps bad numbers out of Shampoo's state: gradient screening and the warnings that explain a skip.

A parameter whose gradient is non-finite, or so large that its Kronecker statistics would overflow fp32,
skips its update for the step: its moments and factors stay untouched (the parameter keeps training at the
next good step), the skip is counted and the first one per parameter is warned about.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch
from torch import Tensor

# ‖G‖_F² above this could overflow fp32 statistics: it bounds every entry of G₍ᵢ₎G₍ᵢ₎ᵀ (Cauchy–Schwarz),
# with headroom for a running sum (β2 = 1) over many steps.
OVERFLOW_LIMIT = torch.finfo(torch.float32).max * 1e-6


def check_supported(param: Tensor, name: str) -> None:
    """Refuse gradients Shampoo cannot precondition, naming the parameter and what to do."""
    if param.grad is not None and param.grad.is_sparse:
        raise ValueError(
            f"Shampoo does not support sparse gradients ({name}); use dense embeddings (sparse=False) or "
            "another optimizer for this parameter."
        )
    if torch.is_complex(param) or (param.grad is not None and torch.is_complex(param.grad)):
        raise TypeError(
            f"Shampoo does not support complex parameters ({name}); view them as real with "
            "torch.view_as_real."
        )


def unusable_gradients(grads: list[Tensor]) -> dict[int, float]:
    """``{position: max|g|}`` of the gradients that are non-finite or would overflow the statistics.

    One fused pass over all gradients and one host sync, like the AMP grad scaler's found-inf check. The
    pass takes Frobenius norms (non-finite, or past :data:`OVERFLOW_LIMIT`, exactly when a gradient is
    unusable), which CPUs reduce several times faster than max|g|; max|g| is computed for the rare
    unusable gradient only, to say which of the two it is.
    """
    checked = [i for i, grad in enumerate(grads) if grad.numel()]
    if not checked:
        return {}
    norms = torch._foreach_norm([grads[i] for i in checked], 2, dtype=torch.float32)  # fp16 sums overflow
    device = norms[0].device
    values = torch.stack([n if n.device == device else n.to(device) for n in norms]).tolist()
    return {
        i: float(grads[i].abs().max())
        for i, value in zip(checked, values, strict=True)
        if not math.isfinite(value) or value * value > OVERFLOW_LIMIT
    }


def skip_message(name: str, largest: float) -> str:
    """Why the update of parameter ``name`` is skipped (``largest``: its max|g|, NaN if unknown here)."""
    if math.isfinite(largest):
        problem = f"gradient too large (max |g| = {largest:.3g}: its statistics would overflow fp32)"
    else:
        problem = "non-finite gradient"
    return (
        f"Shampoo: {problem} in {name}; its update is skipped and its statistics and moments are left "
        "untouched (further occurrences are only counted in metrics()['nonfinite_skips']). Check the loss "
        "scale or clip gradients."
    )


def rejected_message(rejected: int) -> str:
    """Why the preconditioners did not change at a refresh whose every result failed its checks."""
    return (
        f"Shampoo: every result of a refresh was rejected ({rejected} matrices failed their checks); the "
        "previous preconditioners stay, and parameters never preconditioned keep their diagonal update. "
        "Check metrics()['max_root_residual'] and the factors for non-finite values."
    )


class Warnings:
    """Warns once per key, attributed to the user's line that called ``step()``."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()

    def once(self, key: tuple[str, int], message: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=caller_stacklevel())


def caller_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning raised in the calling function to the first frame outside
    torch, this package and the trainers that wrap ``step()`` (Lightning, Accelerate): the user's line."""
    names = ("torch", "lightning", "pytorch_lightning", "accelerate", __package__)
    files = [getattr(sys.modules.get(name), "__file__", None) for name in names]
    folders = tuple(os.path.dirname(file) + os.sep for file in files if file)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(folders):
        frame, level = frame.f_back, level + 1
    return level
