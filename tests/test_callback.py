"""ShampooCallback with a real Lightning Trainer on CPU, one process: refresh schedule, logging, shutdown,
checkpoint state and bitwise resume mid-epoch."""

from __future__ import annotations

import csv
import logging
import threading
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_shampoo import OnRequest, Shampoo
from lightning_shampoo.callbacks import ShampooCallback
from lightning_shampoo.recipes import Digits, DigitsMLP


class StepLog(Callback):
    """After every batch: the loss, the optimizer's step count, and the steps at which a refresh ran."""

    def __init__(self) -> None:
        self.losses: dict[int, torch.Tensor] = {}
        self.refresh_steps: list[int] = []
        self.refresh_counts: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        metrics = trainer.optimizers[0].metrics()
        if metrics["refreshes"] > (self.refresh_counts[-1] if self.refresh_counts else 0.0):
            self.refresh_steps.append(int(metrics["step"]))
        self.refresh_counts.append(metrics["refreshes"])
        self.losses[trainer.global_step] = outputs["loss"].detach().clone()


class RaiseAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"stopped at step {self.step}")


class RecordingShampoo(Shampoo):
    """Shampoo that records when it is closed, drained and saved."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.calls: list[str] = []

    def close(self, wait: bool = True) -> None:
        self.calls.append("close")
        super().close(wait)

    def drain(self) -> None:
        self.calls.append("drain")
        super().drain()

    def state_dict(self) -> dict[str, Any]:
        self.calls.append("state_dict")
        return super().state_dict()


def _model(optimizer: type[Shampoo] = Shampoo, **shampoo: Any) -> DigitsMLP:
    pl.seed_everything(7)
    factory = partial(optimizer, **{"lr": 3e-3, "refresh_policy": OnRequest(), **shampoo})
    return DigitsMLP(hidden=32, depth=1, optimizer=factory)


def _fit(
    model: pl.LightningModule, callbacks: list[Callback], ckpt_path: str | None = None, **kwargs: Any
) -> pl.Trainer:
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer = pl.Trainer(callbacks=callbacks, **{**settings, **kwargs})
    trainer.fit(model, Digits(batch_size=64), ckpt_path=ckpt_path)
    return trainer


def test_refreshes_at_step_and_epoch_boundaries_and_logs_metrics(tmp_path: Path) -> None:
    log = StepLog()
    callback = ShampooCallback(every_n_steps=4, on_epoch_end=True)
    trainer = _fit(
        _model(),
        [callback, log],
        max_epochs=3,
        limit_train_batches=10,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    # Epochs end after steps 10 and 20 (refresh at the next step); the request after step 30 is never used.
    expected = [t for t in range(1, 31) if t % 4 == 0 or t in (11, 21)]
    assert log.refresh_steps == expected
    assert trainer.optimizers[0].metrics()["refreshes"] == len(expected)

    with open(Path(trainer.logger.log_dir) / "metrics.csv") as file:
        logged = [float(row["shampoo/refreshes"]) for row in csv.DictReader(file) if row["shampoo/refreshes"]]
    assert logged == log.refresh_counts
    assert {"shampoo/refreshes", "shampoo/roots_rejected"} <= set(trainer.progress_bar_metrics)
    assert "shampoo/roots_accepted" not in trainer.progress_bar_metrics
    assert trainer.callback_metrics["shampoo/roots_accepted"] > 0


def test_gradient_accumulation_counts_optimizer_steps() -> None:
    log = StepLog()
    trainer = _fit(
        _model(),
        [ShampooCallback(every_n_steps=2), log],
        max_epochs=1,
        limit_train_batches=12,
        accumulate_grad_batches=3,
    )
    assert trainer.global_step == 4
    assert trainer.optimizers[0].metrics()["step"] == 4
    assert log.refresh_steps == [2, 4]


def test_amp_skipped_step_is_not_counted() -> None:
    class InfAtThirdBatch(DigitsMLP):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 2 else loss

    pl.seed_everything(7)
    model = InfAtThirdBatch(hidden=32, depth=1, optimizer=partial(Shampoo, refresh_policy=OnRequest()))
    log = StepLog()
    precision = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    trainer = _fit(model, [ShampooCallback(every_n_steps=2), log], max_steps=6, plugins=[precision])
    # Lightning counts the skipped step (global_step 6); the optimizer ran 5 steps, refreshing at 2 and 4.
    assert trainer.global_step == 6
    assert trainer.optimizers[0].metrics()["step"] == 5
    assert log.refresh_steps == [2, 4]


def test_closes_at_fit_end_and_on_exception() -> None:
    trainer = _fit(_model(RecordingShampoo), [ShampooCallback(every_n_steps=2)], max_steps=3)
    assert trainer.optimizers[0].calls.count("close") == 1

    # A failing fit with a background refresh worker leaves no thread behind.
    threads = set(threading.enumerate())
    model = _model(RecordingShampoo, refresh="async", refresh_lag=1)
    callbacks: list[Callback] = [ShampooCallback(every_n_steps=2), RaiseAtStep(5)]
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        max_steps=10,
        callbacks=callbacks,
    )
    with pytest.raises(RuntimeError, match="stopped at step 5"):
        trainer.fit(model, Digits(batch_size=64))
    assert trainer.optimizers[0].calls.count("close") == 1
    assert trainer.optimizers[0].metrics()["refreshes"] == 2
    assert set(threading.enumerate()) <= threads


def test_state_dict_round_trip_and_drain_before_optimizer_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    callback = ShampooCallback(every_n_steps=2, on_epoch_end=True)
    trainer = _fit(_model(RecordingShampoo), [callback, checkpoint], max_steps=3, enable_checkpointing=True)
    # Pending refreshes are drained before Lightning takes the optimizer state for the checkpoint.
    calls = trainer.optimizers[0].calls
    assert calls.index("drain") < calls.index("state_dict") < calls.index("close")

    saved = torch.load(tmp_path / "epoch=0-step=3.ckpt", weights_only=False)["callbacks"]["ShampooCallback"]
    assert saved == callback.state_dict() == {"every_n_steps": 2, "on_epoch_end": True}

    with caplog.at_level(logging.INFO):
        ShampooCallback(every_n_steps=2, on_epoch_end=True).load_state_dict(saved)
    assert "every_n_steps" not in caplog.text
    with caplog.at_level(logging.INFO):
        ShampooCallback(every_n_steps=5).load_state_dict(saved)
    assert "written with every_n_steps=2, on_epoch_end=True" in caplog.text


def test_messages_say_what_to_do(caplog: pytest.LogCaptureFixture) -> None:
    pl.seed_everything(7)
    adamw = DigitsMLP(hidden=8, depth=1, optimizer=torch.optim.AdamW)
    with pytest.warns(
        UserWarning, match=r"no lightning_shampoo.Shampoo among the Trainer's optimizers \(AdamW\)"
    ):
        _fit(adamw, [ShampooCallback(every_n_steps=1)], max_steps=1)
    with pytest.warns(UserWarning, match="never computed. Set every_n_steps and/or on_epoch_end"):
        _fit(_model(), [ShampooCallback()], max_steps=1)
    with caplog.at_level(logging.INFO):
        _fit(_model(refresh_policy=None), [ShampooCallback(every_n_steps=2)], max_steps=1)
    assert "owns the refresh schedule: it replaces optimizer 0's refresh_policy" in caplog.text
    assert "(EveryNSteps(start=10, frequency=10)) with EveryNSteps(start=2, frequency=2)" in caplog.text
    with pytest.warns(UserWarning, match=r"refresh_lag=100 steps .* Pass refresh_lag <= 5 to the optimizer"):
        _fit(_model(refresh="async", precondition_frequency=100), [ShampooCallback(every_n_steps=5)],
             max_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(_model(refresh="async", refresh_lag=5), [ShampooCallback(every_n_steps=5)], max_steps=1)
    assert not [w for w in caught if "refresh_lag" in str(w.message)]  # a lag within the schedule is fine


def _optimizer_tensors(trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    state = trainer.optimizers[0].state_dict()["state"]
    return {
        f"{index}.{key}": value
        for index, entry in state.items()
        for key, value in entry.items()
        if isinstance(value, torch.Tensor)
    }


@pytest.mark.parametrize("refresh", [{}, {"refresh": "async", "refresh_lag": 2}], ids=["sync", "async-lag2"])
def test_resume_mid_epoch_is_bitwise(tmp_path: Path, refresh: dict[str, Any]) -> None:
    def callbacks(*extra: Callback) -> list[Callback]:
        return [ShampooCallback(every_n_steps=3, on_epoch_end=True), *extra]

    # Epochs of 12 batches; the checkpoint at step 17 is 5 batches into the second epoch.
    schedule = dict(limit_train_batches=12, max_steps=30)
    full = StepLog()
    reference = _fit(_model(**refresh), callbacks(full), **schedule)

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=17)
    interrupted = StepLog()
    with pytest.raises(RuntimeError, match="stopped"):
        _fit(
            _model(**refresh),
            callbacks(interrupted, checkpoint, RaiseAtStep(20)),
            enable_checkpointing=True,
            **schedule,
        )

    resumed = StepLog()
    model = _model(**refresh)
    trainer = _fit(model, callbacks(resumed), ckpt_path=str(tmp_path / "epoch=1-step=17.ckpt"), **schedule)

    assert sorted(resumed.losses) == list(range(18, 31))
    for step, loss in [*interrupted.losses.items(), *resumed.losses.items()]:
        assert torch.equal(loss, full.losses[step]), step
    assert resumed.refresh_steps == [t for t in full.refresh_steps if t > 17]
    for name, value in _optimizer_tensors(reference).items():
        assert torch.equal(value, _optimizer_tensors(trainer)[name]), name
    for (name, value), resumed_value in zip(
        reference.lightning_module.state_dict().items(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(value, resumed_value), name
