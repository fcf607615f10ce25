"""Everything the Lightning glue takes from Lightning's private internals, in one place.

Lightning's strategies are extended through a few non-public names; when a Lightning release moves one,
this module is the only one to change. Each is used for one reason:

* ``_StrategyRegistry``, ``_PATH``: types in the signatures of the strategy methods overridden (public
  methods, private types).
* ``_is_sharded_checkpoint`` / ``_load_checkpoint``: how ``ModelParallelStrategy`` recognises and loads
  its distributed checkpoint folders; ``ShampooFSDPStrategy.load_checkpoint`` reuses them for the model and
  the other optimizers.
* ``ModelParallelStrategy``'s ``_data_parallel_size``, ``_tensor_parallel_size`` and
  ``_save_distributed_checkpoint`` attributes: resolved by ``ShampooFSDPStrategy`` (FSDP on every rank by
  default) and checked (Shampoo's state is always saved per rank).
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.strategies import _StrategyRegistry as StrategyRegistryType
from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint as is_sharded_checkpoint
from lightning.fabric.strategies.model_parallel import _load_checkpoint as load_model_parallel_checkpoint
from lightning.fabric.utilities.types import _PATH as CheckpointPath
from lightning.pytorch.strategies import ModelParallelStrategy

__all__ = [
    "CheckpointPath",
    "StrategyRegistryType",
    "is_sharded_checkpoint",
    "load_model_parallel_checkpoint",
    "parallel_sizes",
    "saves_distributed_checkpoint",
    "set_parallel_sizes",
]


def parallel_sizes(strategy: ModelParallelStrategy) -> tuple[Any, Any]:
    """``(data_parallel_size, tensor_parallel_size)`` as configured (``"auto"`` until resolved)."""
    return strategy._data_parallel_size, strategy._tensor_parallel_size


def set_parallel_sizes(strategy: ModelParallelStrategy, data_parallel: int, tensor_parallel: int) -> None:
    strategy._data_parallel_size = data_parallel
    strategy._tensor_parallel_size = tensor_parallel


def saves_distributed_checkpoint(strategy: ModelParallelStrategy) -> bool:
    return bool(strategy._save_distributed_checkpoint)
