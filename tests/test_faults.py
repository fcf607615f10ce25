"""Faults a user or a fault injector meets: Ctrl-C with refresh work in flight, refreshes whose results
are all rejected (logged by the Lightning callback), and parameter groups added mid-run on 2 ranks by
Lightning's BackboneFinetuning. The single-process contract (bad gradients, corrupt checkpoints, failed
refreshes, copies, compile) is in test_contract.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from dist_utils import free_port
from lightning.pytorch.callbacks import BackboneFinetuning, Callback

from lightning_shampoo import OnRequest, Shampoo
from lightning_shampoo.callbacks import ShampooCallback
from lightning_shampoo.recipes import Digits, DigitsMLP

CTRL_C_SCRIPT = textwrap.dedent(
    """
    import sys, threading, torch
    from torch import nn
    from lightning_shampoo import Shampoo, refresh, requests
    never, threads = threading.Event(), None
    if sys.argv[1] == "stuck":  # a worker that never finishes, and a step waiting for it
        refresh.compute_refresh = lambda snapshots, settings, *workers: never.wait()
        model, lag = nn.Linear(64, 64), 1
    elif sys.argv[1] == "stuck_helpers":  # the same on the worker's helper threads (refresh_threads > 1)
        requests._compute_stack = lambda *arguments: never.wait()
        model, lag, threads = nn.Linear(64, 64), 1, 2
    else:  # a long refresh in flight (a 3072-wide factor) while training goes on
        model, lag = nn.Linear(3072, 8, bias=False), 50
    opt = Shampoo(model.parameters(), refresh="async", refresh_lag=lag, start_preconditioning_step=1,
                  precondition_frequency=100, block_size=4096, refresh_threads=threads)
    print("ready", flush=True)
    while True:
        opt.zero_grad()
        model(torch.randn(8, model.in_features)).square().sum().backward()
        opt.step()
    """
)


@pytest.mark.parametrize("worker", ["stuck", "stuck_helpers", "long_refresh"])
def test_ctrl_c_ends_the_process_whatever_the_worker_is_doing(worker: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT, worker],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # training (or waiting for the stuck worker) with the refresh in flight
        process.send_signal(signal.SIGINT)
        # A join on the worker would never return for the stuck one; the bound is generous for a loaded
        # machine (exits take well under a second when the machine is idle).
        _, stderr = process.communicate(timeout=15)
    finally:
        process.kill()
    assert "KeyboardInterrupt" in stderr


def test_the_callback_logs_refreshes_whose_results_were_all_rejected() -> None:
    pl.seed_everything(7)
    # An impossible residual bound: every root is rejected; the run stays on the graft (Adam).
    factory = partial(Shampoo, lr=3e-3, refresh_policy=OnRequest(), max_root_residual=1e-300)
    model = DigitsMLP(hidden=16, depth=1, optimizer=factory)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[ShampooCallback(every_n_steps=2)],
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="every result of a refresh was rejected"):
        trainer.fit(model, Digits(batch_size=32))
    assert trainer.callback_metrics["shampoo/rejected_refreshes"] == 2
    assert trainer.callback_metrics["shampoo/roots_accepted"] == 0


# ------------------------------------------------------------------ BackboneFinetuning on 2 ranks

UNFREEZE_AT_EPOCH, EPOCHS, BATCHES = 1, 3, 4


class BackboneMLP(DigitsMLP):
    """The digits MLP with its first layer as the ``backbone`` that BackboneFinetuning unfreezes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backbone = self.net[0]

    def configure_optimizers(self) -> Shampoo:
        trainable = [p for name, p in self.named_parameters() if not name.startswith(("backbone", "net.0"))]
        return self.optimizer_factory(trainable)


class Record(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.backbone: list[torch.Tensor] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.backbone.append(pl_module.backbone.weight.detach().clone())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.backbone.append(pl_module.backbone.weight.detach().clone())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = {
            "params": torch.cat([p.detach().flatten() for p in pl_module.parameters()]),
            "backbone": self.backbone,
            "groups": len(trainer.optimizers[0].param_groups),
        }
        torch.save(data, self.out / f"rank{trainer.global_rank}.pt")


def test_backbone_finetuning_adds_a_group_on_two_ranks_and_they_stay_identical(tmp_path: Path) -> None:
    pl.seed_everything(7)
    factory = partial(Shampoo, lr=3e-3, block_size=16, precondition_frequency=3, start_preconditioning_step=2)
    trainer = pl.Trainer(
        strategy="shampoo_ddp_fork", accelerator="cpu", devices=2, max_epochs=EPOCHS,
        limit_train_batches=BATCHES, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=UNFREEZE_AT_EPOCH), Record(tmp_path)],
    )  # fmt: skip
    with mock.patch.dict(os.environ, {"MASTER_PORT": str(free_port())}):
        trainer.fit(BackboneMLP(hidden=24, depth=2, optimizer=factory), Digits(batch_size=32))
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    assert torch.equal(first["params"], second["params"])
    assert first["groups"] == second["groups"] == 2
    # Frozen through epoch 0, trained by Shampoo once its group was added at the start of epoch 1.
    initial, after_frozen_epoch, *trained = first["backbone"]
    assert torch.equal(after_frozen_epoch, initial) and not torch.equal(trained[-1], initial)
