"""Shampoo (Anil et al., "Scalable Second Order Optimization for Deep Learning") for PyTorch.

The public names load on first use, so ``import lightning_shampoo`` imports nothing heavy (the console
script sets OpenMP's wait policy before torch loads).

The Lightning strategies ``shampoo_ddp`` / ``shampoo_fsdp`` are registered when
``lightning_shampoo.strategies`` is imported (``lightning_shampoo.callbacks`` and the ``lightning-shampoo``
CLI import it), when ``Shampoo`` is first used with ``lightning.pytorch`` already imported, or by
:func:`register_strategies`.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .optimizer import Shampoo
    from .policies import EveryNSteps, FunctionPolicy, OnRequest, RefreshPolicy
    from .roots import RootResult, inverse_pth_root

_EXPORTS = {
    "Shampoo": "optimizer",
    "EveryNSteps": "policies",
    "FunctionPolicy": "policies",
    "OnRequest": "policies",
    "RefreshPolicy": "policies",
    "RootResult": "roots",
    "inverse_pth_root": "roots",
}
__all__ = [
    "EveryNSteps",
    "FunctionPolicy",
    "OnRequest",
    "RefreshPolicy",
    "RootResult",
    "Shampoo",
    "inverse_pth_root",
    "register_strategies",
]
__version__ = "0.1.0"


def register_strategies() -> None:
    """Register ``strategy="shampoo_ddp"`` / ``"shampoo_fsdp"`` (and the spawn/fork variants) with
    Lightning's strategy registry; idempotent. Call it before building the ``Trainer``."""
    importlib.import_module(".strategies", __name__)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    if "lightning.pytorch" in sys.modules:  # a Lightning user: the strategy names work at once
        register_strategies()
    return value
