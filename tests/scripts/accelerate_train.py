"""Shampoo under ``accelerate launch`` on 2 CPU processes, run by ``tests/test_accelerate.py`` as
``accelerate launch ... accelerate_train.py OUT``.

Trains ``STEPS`` optimizer steps of ``ACCUMULATE`` micro-batches each, saving the state after
``SAVED_AT`` steps; then loads that state into a fresh model and optimizer (initialised differently) and
trains the remaining micro-batches; then saves and at once reloads. Also checks that a step the AMP grad
scaler skips is not counted.
Each rank writes ``OUT/rank{r}.pt``.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_shampoo import Shampoo
from lightning_shampoo.accelerate import prepare_shampoo

STEPS, SAVED_AT, ACCUMULATE, BATCH = 8, 4, 2, 4


def build(seed: int) -> tuple[nn.Module, Shampoo]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))
    # Async refresh, lag 1: the refresh of step 4 is in flight at the save, and must load weights-only.
    optimizer = Shampoo(
        model.parameters(),
        lr=1e-2,
        block_size=8,
        start_preconditioning_step=2,
        precondition_frequency=2,
        refresh="async",
        refresh_lag=1,
    )
    return model, optimizer


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    samples = STEPS * ACCUMULATE * BATCH * 2  # 2 ranks
    inputs, targets = (
        torch.randn(samples, 8, generator=generator),
        torch.randn(samples, 4, generator=generator),
    )
    return DataLoader(TensorDataset(inputs, targets), batch_size=BATCH)


def train(
    accelerator: Accelerator, model: nn.Module, optimizer: Any, loader: Any, save_to: Path | None = None
) -> tuple[list[torch.Tensor], dict[int, Any]]:
    """The loss of every micro-batch; with ``save_to``, saves the state there after ``SAVED_AT`` steps and
    also returns the state this rank held then (before ``save_state`` consolidates it)."""
    losses, share = [], {}
    for inputs, targets in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.detach().clone())
        if save_to is not None and accelerator.sync_gradients and steps(optimizer) == SAVED_AT:
            share = copy.deepcopy(optimizer.optimizer.shard_state_dict()["state"])
            accelerator.save_state(save_to)
            save_to = None
    return losses, share


def steps(optimizer: AcceleratedOptimizer) -> float:
    """Shampoo's own step count."""
    return optimizer.optimizer.metrics()["step"]


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def skipped_step_is_not_counted() -> list[tuple[float, bool]]:
    """Shampoo's step counts as seen through Accelerate's wrapper with a real (CPU) grad scaler."""
    model, _ = build(0)
    wrapped = AcceleratedOptimizer(
        Shampoo(model.parameters(), distribute="replicated"), scaler=torch.amp.GradScaler("cpu")
    )
    counts = []
    for factor in (1.0, float("inf"), 1.0):  # what Accelerator.backward does under fp16, then a step
        wrapped.scaler.scale(model(torch.ones(2, 8)).sum() * factor).backward()
        wrapped.step()
        wrapped.zero_grad()
        counts.append((steps(wrapped), wrapped.step_was_skipped))
    return counts


def save_without_prepare_shampoo(accelerator: Accelerator, directory: Path) -> dict[str, Any]:
    """``save_state`` of a sharded Shampoo whose state was never consolidated: it must fail loudly on every
    rank, never write one rank's share as if it were the whole."""
    accelerator.free_memory()
    model, optimizer = build(2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, data())
    train(accelerator, model, optimizer, list(loader)[: 2 * ACCUMULATE])
    try:
        accelerator.save_state(directory)
    except RuntimeError as error:
        outcome = {"error": str(error)}
    else:
        outcome = {"error": ""}
    accelerator.wait_for_everyone()
    outcome["optimizer_file_written"] = (directory / "optimizer.bin").exists()
    optimizer.optimizer.close()
    return outcome


def main(out: Path) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATE)
    results: dict[str, Any] = {"world_size": accelerator.num_processes}

    model, optimizer = build(0)
    model, optimizer, loader = accelerator.prepare(model, optimizer, data())
    hooks = prepare_shampoo(accelerator, optimizer)
    results["losses_full"], results["share_saved"] = train(
        accelerator, model, optimizer, loader, out / "state"
    )
    results["params_full"] = flat(model)
    results["steps_full"] = steps(optimizer)

    for hook in hooks:
        hook.remove()
    accelerator.free_memory()
    model, optimizer = build(1)  # other initial values: the load must overwrite them
    model, optimizer, loader = accelerator.prepare(model, optimizer, data())
    prepare_shampoo(accelerator, optimizer)
    accelerator.load_state(out / "state")
    results["held_after_load"] = sorted(optimizer.optimizer.shard_state_dict()["state"])
    remaining = accelerator.skip_first_batches(loader, SAVED_AT * ACCUMULATE)
    results["losses_resumed"], _ = train(accelerator, model, optimizer, remaining, None)
    results["params_resumed"] = flat(model)
    results["steps_resumed"] = steps(optimizer)

    # A load right after a save: rank 0 writes late, the others must wait for it (prepare_shampoo's hook).
    accelerator.register_save_state_pre_hook(lambda *_: time.sleep(1.0 * accelerator.is_main_process))
    accelerator.save_state(out / "again")
    accelerator.load_state(out / "again")
    results["reloaded_steps"] = steps(optimizer)

    results["scaler_counts"] = skipped_step_is_not_counted()
    results["unprepared_save"] = save_without_prepare_shampoo(accelerator, out / "unprepared")
    torch.save(results, out / f"rank{accelerator.process_index}.pt")
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
