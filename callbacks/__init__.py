"""Lightning callbacks for Shampoo (installed as ``lightning_shampoo.callbacks``)."""

from .shampoo import ShampooCallback

__all__ = ["ShampooCallback"]
