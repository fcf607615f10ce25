"""Shampoo (Anil et al., "Scalable Second Order Optimization for Deep Learning") for PyTorch."""

from .optimizer import Shampoo
from .refresh import EveryNSteps, RefreshPolicy
from .roots import RootResult, inverse_pth_root

__all__ = ["EveryNSteps", "RefreshPolicy", "RootResult", "Shampoo", "inverse_pth_root"]
__version__ = "0.1.0"
