"""``shampoo_fsdp`` on 2 CPU processes, run by ``tests/test_strategies.py`` as
``python lightning_fsdp.py OUT`` (Lightning starts the second rank by running this command again).

Trains an FSDP2 MLP for ``STEPS`` steps writing a distributed checkpoint at the end of the first epoch,
then resumes from it in a fresh Trainer and model. Each rank writes ``OUT/rank{r}.pt``: its local factor and
root shards at the checkpoint and right after the load, the losses of both runs, and its final shards.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_shampoo import Shampoo

STEPS, BATCHES = 8, 4  # epochs of 4 batches per rank; the checkpoint at step 4 ends the first one


class ShardedMLP(pl.LightningModule):
    """Rows 16 and 8 shard into 8 and 4 per rank: ``block_size=4`` splits each shard into blocks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def configure_optimizers(self) -> Shampoo:
        return Shampoo(
            self.parameters(), lr=1e-2, block_size=4, start_preconditioning_step=2, precondition_frequency=3
        )


def local_blocks(optimizer: Shampoo, module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """This rank's factor and root stacks (the optimizer keeps them as plain local tensors)."""
    return {
        f"{name}.{key}": value.clone()
        for name, param in module.named_parameters()
        for key, value in optimizer.state[param].items()
        if key.startswith(("factor_", "root_"))
    }


def local_shards(module: pl.LightningModule) -> torch.Tensor:
    return torch.cat([p.to_local().detach().flatten() for p in module.parameters()])


class Record(Callback):
    def __init__(self, results: dict[str, Any], run: str) -> None:
        self.results = results
        self.run = run
        self.losses: dict[int, torch.Tensor] = results.setdefault(f"losses_{run}", {})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run == "resumed":
            self.results["factors_loaded"] = local_blocks(trainer.optimizers[0], pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.losses[trainer.global_step] = outputs["loss"].detach().clone()
        if self.run == "full" and trainer.global_step == BATCHES:  # runs before ModelCheckpoint saves
            self.results["factors_saved"] = local_blocks(trainer.optimizers[0], pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.results[f"shards_{self.run}"] = local_shards(pl_module)


def fit(out: Path, results: dict[str, Any], run: str, ckpt_path: Path | None = None) -> pl.Trainer:
    generator = torch.Generator().manual_seed(1)
    samples = 2 * BATCHES * 8  # batches of 8 on each of 2 ranks
    data = TensorDataset(
        torch.randn(samples, 8, generator=generator), torch.randn(samples, 4, generator=generator)
    )
    callbacks: list[Callback] = [Record(results, run)]
    if run == "full":
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=BATCHES, save_top_k=-1))
    trainer = pl.Trainer(
        strategy="shampoo_fsdp",
        accelerator="cpu",
        devices=2,
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=run == "full",
        default_root_dir=out,
        callbacks=callbacks,
    )
    trainer.fit(ShardedMLP(), DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    return trainer


def main(out: Path) -> None:
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    trainer = fit(out, results, "full")
    fit(out, results, "resumed", ckpt_path=out / "ckpt" / f"epoch=0-step={BATCHES}.ckpt")
    torch.save(results, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
