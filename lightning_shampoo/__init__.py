"""Shampoo (Anil et al., "Scalable Second Order Optimization for Deep Learning") for PyTorch."""

from .optimizer import Shampoo
from .refresh import EveryNSteps, FunctionPolicy, OnRequest, RefreshPolicy
from .roots import RootResult, inverse_pth_root

__all__ = [
    "EveryNSteps",
    "FunctionPolicy",
    "OnRequest",
    "RefreshPolicy",
    "RootResult",
    "Shampoo",
    "inverse_pth_root",
]
__version__ = "0.1.0"

# Last: registers the Lightning strategies once lightning.pytorch is imported (now, or when it is).
from ._post_import import import_after as _import_after

_import_after("lightning.pytorch", "lightning_shampoo.strategies")
