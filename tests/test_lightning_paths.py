"""Shampoo through Lightning's normal training paths (closure, gradient accumulation, gradient clipping,
bf16-mixed precision, several parameter groups), checked against the same steps written by hand."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_shampoo import Shampoo

ACCUMULATE = 2
CLIP = 0.5
STEPS = 6
SHAMPOO = dict(precondition_frequency=2, start_preconditioning_step=1, betas=(0.9, 0.99))


def _network() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))


def _groups(net: nn.Module) -> list[dict]:
    """Weights and biases in separate groups with their own lr and weight decay."""
    weights = [p for name, p in net.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in net.named_parameters() if name.endswith("bias")]
    return [{"params": weights, "lr": 1e-2, "weight_decay": 0.1}, {"params": biases, "lr": 3e-3}]


def _batches() -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * ACCUMULATE * 8, 12, generator=generator)
    y = torch.randint(0, 4, (len(x),), generator=generator)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _network()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return F.cross_entropy(self.net(inputs), targets)

    def configure_optimizers(self) -> Shampoo:
        return Shampoo(_groups(self.net), **SHAMPOO)


def _by_hand() -> tuple[nn.Module, Shampoo]:
    """The formulas of the Lightning paths: autocast to bf16, loss / ACCUMULATE summed over micro-batches,
    clip the total gradient norm, then one optimizer step."""
    net = _network()
    optimizer = Shampoo(_groups(net), **SHAMPOO)
    batches = _batches()
    for step in range(STEPS):
        optimizer.zero_grad()
        for inputs, targets in batches[step * ACCUMULATE : (step + 1) * ACCUMULATE]:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(net(inputs), targets)
            (loss / ACCUMULATE).backward()
        # Lightning clips the optimizer's parameters in param-group order (weights, then biases); the total
        # norm's rounding depends on that order.
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], CLIP)
        optimizer.step()
    return net, optimizer


@pytest.fixture(scope="module")
def trained() -> tuple[Classifier, pl.Trainer]:
    model = Classifier()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        accumulate_grad_batches=ACCUMULATE,
        gradient_clip_val=CLIP,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(*map(torch.cat, zip(*_batches()))), batch_size=8))
    return model, trainer


def test_lightning_step_equals_the_hand_written_step(trained: tuple[Classifier, pl.Trainer]) -> None:
    model, trainer = trained
    reference, reference_optimizer = _by_hand()
    optimizer = trainer.optimizers[0]
    assert optimizer.metrics()["step"] == STEPS  # micro-batches of accumulation are not steps
    assert optimizer.metrics()["refreshes"] == reference_optimizer.metrics()["refreshes"] > 0
    for (name, got), expected in zip(model.net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)


def test_groups_keep_their_own_options_through_lightning(trained: tuple[Classifier, pl.Trainer]) -> None:
    groups = trained[1].optimizers[0].param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-2, 0.1), (3e-3, 0.0)]
    state = trained[1].optimizers[0].state
    assert all(state[p]["exp_avg"].dtype == torch.float32 for g in groups for p in g["params"])
