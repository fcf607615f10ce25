"""Lightning strategies for :class:`~lightning_shampoo.Shampoo`, registered by name on import.

``Trainer(strategy="shampoo_ddp")`` / ``"shampoo_fsdp"`` (or ``trainer.strategy: shampoo_ddp`` in a
LightningCLI YAML) work once this module is imported: by ``lightning_shampoo.callbacks``, by the
``lightning-shampoo`` CLI, by ``lightning_shampoo.register_strategies()``, or by using ``Shampoo`` after
``lightning.pytorch`` is imported. ``shampoo_ddp_spawn`` and ``shampoo_ddp_fork`` start the processes like
``ddp_spawn`` / ``ddp_fork`` (for notebooks and pytest, where ``"ddp"`` re-runs the command line in every
child).

**Plain** ``strategy="ddp"`` **works too.** Shampoo shards its work over the default process group at its
first step (``distribute="sharded"``; ``"replicated"`` makes every rank do everything), and Lightning's
``Strategy.optimizer_state`` calls ``consolidate_state_dict()`` on every rank before a checkpoint is
written, so rank 0 saves the complete state (Shampoo refuses to hand out a share silently). What
``shampoo_ddp`` adds:

* it hands DDP's process group to every Shampoo optimizer (``set_process_group``) in ``setup``, before
  Lightning restores a checkpoint, so each rank loads only its own parameters' state (under plain
  ``"ddp"`` every rank holds the complete state until its first step) and parameters that differ between
  ranks are refused in ``setup``, not at the first step;
* it stops Shampoo's background refresh workers at teardown (end of fit, or a failure), also without
  :class:`~lightning_shampoo.callbacks.ShampooCallback`.

``shampoo_fsdp`` is Lightning's ``ModelParallelStrategy`` (FSDP2, ``fully_shard`` in the module's
``configure_model``; unlike ``FSDPStrategy`` it runs on CPU with gloo) with every device data-parallel by
default, and checkpoints that keep Shampoo's state. ``ModelParallelStrategy`` saves optimizers with
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``, which keeps only ``state`` and
``param_groups`` (Shampoo's step count and in-flight refreshes are lost) and, for an optimizer without
state, runs a zero-gradient ``step()`` to create it; here Shampoo's state goes through
:mod:`lightning_shampoo.checkpoint` instead: per-rank DCP files in which each rank's factors are DTensor
shards, so every rank gets its own back.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from ._lightning import (
    CheckpointPath,
    StrategyRegistryType,
    is_sharded_checkpoint,
    load_model_parallel_checkpoint,
    parallel_sizes,
    saves_distributed_checkpoint,
    set_parallel_sizes,
)
from .checkpoint import load_sharded_state_dict, sharded_state_dict
from .optimizer import Shampoo, unwrap


class _ShampooStrategyMixin:
    """What both strategies do for the Shampoo optimizers among ``self.optimizers``."""

    optimizers: list[Optimizer]

    def shampoo_optimizers(self) -> list[Shampoo]:
        """The Trainer's Shampoo optimizers."""
        return [opt for opt in map(unwrap, self.optimizers) if isinstance(opt, Shampoo)]

    def teardown(self) -> None:
        # Idempotent, and stepping again restarts a worker: safe next to ShampooCallback's own close().
        for optimizer in self.shampoo_optimizers():
            optimizer.close()
        super().teardown()  # type: ignore[misc]


class ShampooDDPStrategy(_ShampooStrategyMixin, DDPStrategy):
    """``DDPStrategy`` that hands its process group to every Shampoo optimizer in ``setup``.

    Takes ``DDPStrategy``'s arguments. Checkpoints hold the complete optimizer state (written by rank 0
    after ``consolidate_state_dict``, a collective Lightning runs on every rank); on load every rank reads
    the complete state and keeps its own parameters' part, so a checkpoint resumes on any number of ranks.
    """

    strategy_name = "shampoo_ddp"

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        # After DDP's wrapping (which broadcast rank 0's parameters) and before Lightning restores a
        # checkpoint: Shampoo checks the parameters are replicated and each rank then loads its share only.
        group = self.model.process_group if isinstance(self.model, DistributedDataParallel) else None
        for optimizer in self.shampoo_optimizers():
            optimizer.set_process_group(group)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistryType) -> None:
        for name, start_method in (
            ("shampoo_ddp", "popen"),
            ("shampoo_ddp_spawn", "spawn"),
            ("shampoo_ddp_fork", "fork"),
        ):
            _register(
                strategy_registry,
                name,
                cls,
                f"DDP handing its process group to Shampoo, `start_method` '{start_method}'",
                start_method=start_method,
            )


class ShampooFSDPStrategy(_ShampooStrategyMixin, ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2) whose checkpoints keep Shampoo's per-rank factor state.

    Args:
        data_parallel_size: ranks that shard the model (FSDP); ``"auto"``: all of them divided by
            ``tensor_parallel_size``.
        tensor_parallel_size: ranks of a tensor-parallel group (1: plain FSDP).
        save_distributed_checkpoint: must stay ``True`` with Shampoo optimizers: their state is saved per
            rank with DCP (a folder with a file per rank), never gathered into one file.
        process_group_backend: e.g. ``"gloo"`` (default for CPU) or ``"nccl"``.
        timeout: of the process group's collectives.

    Shampoo preconditions each rank's shard of every parameter as blocks of its own (see
    :mod:`lightning_shampoo.distributed`). Other optimizers are saved and loaded as by
    ``ModelParallelStrategy``.
    """

    strategy_name = "shampoo_fsdp"

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    @override
    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" is one data-parallel rank per node; FSDP means all ranks.
        world_size = self.num_nodes * self.num_processes
        data_parallel, tensor_parallel = parallel_sizes(self)
        if tensor_parallel == "auto":
            tensor_parallel = self.num_processes
        if data_parallel == "auto":
            data_parallel = max(world_size // tensor_parallel, 1)
        set_parallel_sizes(self, data_parallel, tensor_parallel)
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if self.shampoo_optimizers() and not saves_distributed_checkpoint(self):
            raise ValueError(
                "ShampooFSDPStrategy(save_distributed_checkpoint=False) would gather Shampoo's state into "
                "one file, which it does not support: its factors are saved per rank with DCP. Keep "
                "save_distributed_checkpoint=True (the default)."
            )

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        optimizer = unwrap(optimizer)
        if isinstance(optimizer, Shampoo):
            return sharded_state_dict(optimizer)
        return super().optimizer_state(optimizer)

    @override
    def load_checkpoint(
        self, checkpoint_path: CheckpointPath, weights_only: bool | None = None
    ) -> dict[str, Any]:
        shampoo = {
            f"optimizer_{index}": optimizer
            for index, optimizer in enumerate(map(unwrap, self.optimizers))
            if isinstance(optimizer, Shampoo)
        }
        if not shampoo:
            return super().load_checkpoint(checkpoint_path, weights_only)
        path = Path(self.broadcast(checkpoint_path))
        if not is_sharded_checkpoint(path):
            raise ValueError(
                f"{path} is not a distributed checkpoint folder; ShampooFSDPStrategy resumes Shampoo's state "
                "only from the folders it writes (save_distributed_checkpoint=True)."
            )
        # The model and the other optimizers load as in ModelParallelStrategy, Shampoo from its own keys.
        others = {
            f"optimizer_{index}": optimizer
            for index, optimizer in enumerate(self.optimizers)
            if f"optimizer_{index}" not in shampoo
        }
        assert self.lightning_module is not None
        metadata = load_model_parallel_checkpoint(
            path=path,
            state={"state_dict": self.model, **others},
            strict=self.lightning_module.strict_loading,
            optimizer_states_from_list=True,
            weights_only=weights_only,
        )
        for key, optimizer in shampoo.items():
            load_sharded_state_dict(optimizer, path, key=key)
        return metadata

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistryType) -> None:
        _register(strategy_registry, "shampoo_fsdp", cls, "FSDP2 keeping Shampoo's per-rank factor state")


def _register(registry: StrategyRegistryType, name: str, cls: type, description: str, **params: Any) -> None:
    if name not in registry:  # importing twice (e.g. a reload) keeps the first registration
        registry.register(name, cls, description=description, **params)


ShampooDDPStrategy.register_strategies(StrategyRegistry)
ShampooFSDPStrategy.register_strategies(StrategyRegistry)
