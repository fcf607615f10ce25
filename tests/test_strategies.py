"""The Lightning strategies with a real Trainer on 2 CPU processes (gloo): ``shampoo_ddp`` trains with
sharded Shampoo, writes complete optimizer state and resumes mid-epoch bitwise; plain ``ddp`` follows the
same trajectory; ``shampoo_fsdp`` (a launched script) keeps every rank's factors through DCP."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from dist_utils import assert_checkpoint_is_union_of_shares, free_port
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import StrategyRegistry

from lightning_shampoo import OnRequest, Shampoo
from lightning_shampoo.callbacks import ShampooCallback
from lightning_shampoo.recipes import Digits, DigitsMLP
from lightning_shampoo.strategies import ShampooDDPStrategy, ShampooFSDPStrategy

# Epochs of 6 batches per rank; the checkpoint at step 9 is 3 batches into the second epoch.
STEPS, SAVED_AT, BATCHES = 14, 9, 6
SCRIPTS = Path(__file__).parent / "scripts"


class Record(Callback):
    """Per rank: the loss of every step, the optimizer state this rank holds at the start of training and
    at step ``at`` (before that step's checkpoint is written), and the final parameters."""

    def __init__(self, out: Path, at: int | None = None) -> None:
        self.out = out
        self.at = at
        self.data: dict[str, Any] = {"losses": {}}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.data["held_at_start"] = sorted(trainer.optimizers[0].shard_state_dict()["state"])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.data["losses"][trainer.global_step] = outputs["loss"].detach().clone()
        if trainer.global_step == self.at:  # callbacks run before ModelCheckpoint: not yet consolidated
            self.data["held_at"] = copy.deepcopy(trainer.optimizers[0].shard_state_dict()["state"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.data["params"] = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        self.data["step"] = trainer.optimizers[0].metrics()["step"]
        torch.save(self.data, self.out / f"rank{trainer.global_rank}.pt")


def _fit(
    strategy: str, out: Path, *callbacks: Callback, ckpt_path: Path | None = None
) -> list[dict[str, Any]]:
    """``trainer.fit`` on 2 forked CPU processes with a fresh rendezvous port; each rank's ``Record``."""
    out.mkdir()
    pl.seed_everything(7)
    optimizer = partial(
        Shampoo, lr=3e-3, block_size=16, precondition_frequency=100, refresh_policy=OnRequest()
    )
    model = DigitsMLP(hidden=24, depth=2, optimizer=optimizer)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_steps=STEPS,
        limit_train_batches=BATCHES,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=out,
        callbacks=[ShampooCallback(every_n_steps=4, on_epoch_end=True), Record(out, SAVED_AT), *callbacks],
    )
    with mock.patch.dict(os.environ, {"MASTER_PORT": str(free_port())}):
        trainer.fit(model, Digits(batch_size=32), ckpt_path=ckpt_path)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("strategies")
    saver = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=SAVED_AT, save_top_k=-1)
    full = _fit("shampoo_ddp_fork", root / "full", saver)
    checkpoint = root / "ckpt" / f"epoch=1-step={SAVED_AT}.ckpt"
    resumed = _fit("shampoo_ddp_fork", root / "resumed", ckpt_path=checkpoint)
    return {"full": full, "resumed": resumed, "checkpoint": torch.load(checkpoint, weights_only=False)}


def test_parameters_stay_identical_across_ranks_and_steps_count_once(runs: dict[str, Any]) -> None:
    for run in ("full", "resumed"):
        first, second = runs[run]
        assert torch.equal(first["params"], second["params"]), run
        assert first["step"] == second["step"] == STEPS
    assert not torch.equal(runs["full"][0]["losses"][1], runs["full"][1]["losses"][1])  # ranks' own data


def test_ranks_hold_disjoint_shares_and_the_checkpoint_holds_their_union(runs: dict[str, Any]) -> None:
    shares = [rank["held_at"] for rank in runs["full"]]
    assert_checkpoint_is_union_of_shares(runs["checkpoint"]["optimizer_states"][0], shares)


def test_resume_mid_epoch_continues_the_uninterrupted_run_bitwise(runs: dict[str, Any]) -> None:
    for full, resumed in zip(runs["full"], runs["resumed"]):
        assert sorted(resumed["losses"]) == list(range(SAVED_AT + 1, STEPS + 1))
        for step, loss in resumed["losses"].items():
            assert torch.equal(loss, full["losses"][step]), step
        assert torch.equal(resumed["params"], full["params"])
        # The group was handed over before the restore: each rank loaded only its own share.
        assert resumed["held_at_start"] == sorted(full["held_at"])


def test_plain_ddp_follows_the_same_trajectory(runs: dict[str, Any], tmp_path: Path) -> None:
    plain = _fit("ddp_fork", tmp_path / "plain")
    for rank, reference in zip(plain, runs["full"]):
        assert rank["losses"].keys() == reference["losses"].keys()
        for step, loss in rank["losses"].items():
            assert torch.equal(loss, reference["losses"][step]), step
        assert torch.equal(rank["params"], reference["params"])


def test_strategies_are_found_by_name_also_from_a_cli_config(tmp_path: Path) -> None:
    for name, cls in [
        ("shampoo_ddp", ShampooDDPStrategy),
        ("shampoo_ddp_spawn", ShampooDDPStrategy),
        ("shampoo_ddp_fork", ShampooDDPStrategy),
        ("shampoo_fsdp", ShampooFSDPStrategy),
    ]:
        assert name in StrategyRegistry
        assert type(pl.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False).strategy) is cls
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  strategy: shampoo_ddp\n  accelerator: cpu\n  devices: 2\n  logger: false\n"
    )
    with mock.patch.object(sys, "argv", ["cli"]):
        cli = LightningCLI(DigitsMLP, Digits, run=False, args=["--config", str(config)])
    assert type(cli.trainer.strategy) is ShampooDDPStrategy


@pytest.mark.parametrize(
    ("code", "registered"),
    [
        # Lightning first: using Shampoo registers the names at once.
        ("import lightning.pytorch; from lightning_shampoo import Shampoo", True),
        # The Lightning-facing modules register on import.
        ("import lightning_shampoo.callbacks", True),
        ("import lightning_shampoo.strategies", True),
        ("import lightning_shampoo; lightning_shampoo.register_strategies()", True),
        # Plain PyTorch use registers nothing (and imports no Lightning): no import hook.
        ("from lightning_shampoo import Shampoo; import lightning.pytorch", False),
    ],
)
def test_strategies_register_at_a_documented_point_without_an_import_hook(
    code: str, registered: bool
) -> None:
    check = (
        f"import sys; {code}\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "print(sorted(n for n in StrategyRegistry if n.startswith('shampoo')))\n"
        "print(any(type(f).__module__.startswith('lightning_shampoo') for f in sys.meta_path))"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    names = ["shampoo_ddp", "shampoo_ddp_fork", "shampoo_ddp_spawn", "shampoo_fsdp"]
    assert result.stdout.split("\n")[:2] == [str(names if registered else []), "False"], result.stderr


def test_plain_pytorch_import_loads_no_lightning() -> None:
    code = "import sys, lightning_shampoo; lightning_shampoo.Shampoo; print('lightning' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr


def test_shampoo_fsdp_round_trips_every_ranks_factors_and_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    subprocess.run(
        [sys.executable, str(SCRIPTS / "lightning_fsdp.py"), str(tmp_path)], env=env, check=True, timeout=240
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for rank in ranks:
        saved, loaded = rank["factors_saved"], rank["factors_loaded"]
        assert saved and saved.keys() == loaded.keys()
        for name, value in saved.items():
            assert torch.equal(value, loaded[name]), name
        for step, loss in rank["losses_resumed"].items():
            assert torch.equal(loss, rank["losses_full"][step]), step
        assert torch.equal(rank["shards_resumed"], rank["shards_full"])
    # Each rank preconditions its own shard: the factors differ, so a load that kept one rank's would fail.
    first, second = (rank["factors_saved"] for rank in ranks)
    assert any(not torch.equal(first[name], second[name]) for name in first)


def test_callbacks_and_recipes_have_one_identity_however_they_are_imported() -> None:
    # The folders `callbacks/` and `recipes/` are installed as lightning_shampoo.callbacks / .recipes; with
    # the repository root on sys.path (as in this test run) they are importable by folder name too.
    code = (
        "import sys; sys.path.insert(0, '.')\n"
        "import callbacks, recipes, lightning_shampoo.callbacks as lc, lightning_shampoo.recipes as lr\n"
        "print(callbacks is lc, callbacks.ShampooCallback is lc.ShampooCallback,"
        " recipes.DigitsMLP is lr.DigitsMLP,"
        " 'callbacks.shampoo' in sys.modules, 'recipes.models' in sys.modules)"
    )
    root = Path(__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert result.stdout.split() == ["True", "True", "True", "False", "False"], result.stderr
