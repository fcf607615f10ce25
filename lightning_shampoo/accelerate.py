"""Shampoo with Hugging Face Accelerate: ``save_state`` writes the complete optimizer state.

::

    model, optimizer, loader = accelerator.prepare(model, Shampoo(model.parameters()), loader)
    prepare_shampoo(accelerator, optimizer)   # after prepare (DDP has made the parameters replicated)
    ...
    accelerator.save_state("ckpt")            # rank 0 writes every parameter's Shampoo state
    accelerator.load_state("ckpt")            # each rank keeps its own parameters' part

Why it is needed: on several processes Shampoo shards its work, each rank keeping the state of the
parameters it owns (see :mod:`lightning_shampoo.distributed`), while ``save_state`` writes the main
process's ``optimizer.state_dict()`` only. :func:`prepare_shampoo` registers a ``save_state`` pre-hook
that, on every rank, drains in-flight refreshes and gathers the complete state on rank 0
(``consolidate_state_dict``, a collective). ``load_state`` reads that file on every rank with
``torch.load(weights_only=True)`` — Shampoo's state is tensors and plain Python values — and
``Shampoo.load_state_dict`` keeps this rank's part (the process group is fixed up front, so it knows
which part that is).

Steps: Accelerate's optimizer wrapper calls ``Shampoo.step`` only when ``accelerator.sync_gradients``
(never on gradient-accumulation micro-steps) and only when the AMP grad scaler did not skip the step
(``accelerator.optimizer_step_was_skipped``). Shampoo's own step count (``optimizer.metrics()["step"]``),
which drives its refresh schedule, therefore counts real steps only; key other schedules on it too.

Launching 2 processes on CPU needs ``ACCELERATE_USE_CPU=true`` with the multi-process launcher::

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train.py
    ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate_cpu_2proc.yaml train.py

(``accelerate launch --cpu --num_processes 2`` starts one process; without ``ACCELERATE_USE_CPU`` on a
machine without GPUs each process trains alone, which :func:`prepare_shampoo` refuses.)

FSDP2 (``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))``, on GPUs): Accelerate
shards the model after the optimizer exists and swaps the optimizer's parameters for the DTensor shards;
Shampoo chooses its layout and block plans for the parameters it has when it steps (cached weakly, chosen
again after a swap), so every rank preconditions its own shard (:mod:`lightning_shampoo.layout`).
``save_state`` / ``load_state`` save the optimizer with ``torch.distributed.checkpoint``'s
``get_optimizer_state_dict`` and load it with ``set_optimizer_state_dict``, into a fresh optimizer's state
dict (``SHARDED_STATE_DICT``: ``dcp.save`` / ``dcp.load``; ``FULL_STATE_DICT``: rank 0's file, broadcast);
Shampoo's state dict is made for that (:mod:`lightning_shampoo.statedict`), so the run resumes exactly,
with its step count and the refresh in flight (one per parameter with ``refresh_lag <=
precondition_frequency``; more are dropped with a warning). :func:`prepare_shampoo` is optional there;
called after ``prepare`` it makes ``save_state`` drain refreshes first. Load checkpoints after
``prepare``: state loaded before it belongs to the replaced parameters and is refused.

Accelerate does not run FSDP on CPU: ``AcceleratorState`` switches to ``DistributedType.FSDP`` only for
the multi-GPU (and other accelerator) types, so with ``ACCELERATE_USE_CPU`` the ``fsdp_plugin`` is ignored
and the processes run DDP (``MULTI_CPU``), which the rest of this module covers. The FSDP2 path is tested
on CPU by running what Accelerate does to the optimizer (``prepare_optimizer``, the parameter swap,
``save_fsdp_optimizer`` / ``load_fsdp_optimizer``) on a ``fully_shard`` model
(``tests/test_accelerate_fsdp.py``).
Not covered: DeepSpeed, which saves optimizers its own way.
"""

from __future__ import annotations

import os
from typing import Any

from accelerate import Accelerator
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from .optimizer import Shampoo, unwrap


def prepare_shampoo(accelerator: Accelerator, *optimizers: Optimizer) -> list[RemovableHandle]:
    """Make ``accelerator.save_state`` / ``load_state`` keep the complete state of these Shampoo optimizers.

    Call it on every process after ``accelerator.prepare`` and before the first step, with the prepared
    (or the original) optimizers. Collective: fixes the process group each optimizer shards over (the
    default one, which Accelerate's DDP uses). Registers two hooks: before ``save_state`` writes, every
    rank drains its in-flight refreshes and the state is gathered on rank 0; before ``load_state`` reads,
    the ranks wait for each other, so that a load right after a save never reads a file rank 0 is still
    writing (``save_state`` itself returns without a barrier).

    Returns:
        the hooks' handles; ``remove()`` them before preparing new optimizers on the same accelerator
        (e.g. after ``accelerator.free_memory()``).
    """
    shampoos = [unwrap(optimizer) for optimizer in optimizers]
    for optimizer in shampoos:
        if not isinstance(optimizer, Shampoo):
            raise TypeError(f"prepare_shampoo takes Shampoo optimizers, got {type(optimizer).__name__}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"{launched} processes were launched but Accelerate runs {accelerator.num_processes} of them "
            "together, so each would train on its own. On CPU launch with ACCELERATE_USE_CPU=true "
            "(e.g. `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train.py`)."
        )
    for optimizer in shampoos:
        optimizer.set_process_group(None)

    def consolidate(models: list[Any], weights: list[Any], output_dir: str) -> None:
        for optimizer in shampoos:
            optimizer.drain()  # the file then holds computed roots rather than refreshes to redo
            optimizer.consolidate_state_dict(to=0)

    def wait(models: list[Any], input_dir: str) -> None:
        accelerator.wait_for_everyone()

    return [
        accelerator.register_save_state_pre_hook(consolidate),
        accelerator.register_load_state_pre_hook(wait),
    ]

