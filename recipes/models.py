"""The recipes' models: a byte-level transformer language model and an MLP classifier.

Both take the optimizer and the learning-rate schedule as callables (LightningCLI's dependency injection:
``OptimizerCallable``, ``LRSchedulerCallable``), so a YAML recipe picks them with ``class_path`` /
``init_args`` and plain Python passes e.g. ``lambda params: Shampoo(params, lr=1e-3)`` and
``lambda opt: WarmupCosine(opt, warmup_steps=25)``. The schedule steps once per optimizer step.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from .schedules import WarmupCosine


class _RecipeModule(pl.LightningModule):
    """Cross-entropy training on ``(inputs, targets)`` batches; subclasses add their validation metrics.

    ``throughput_unit`` names what one target element is (the CLI's summary reports it per second).
    """

    throughput_unit = "samples"

    def __init__(self, optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def configure_optimizers(self) -> Optimizer | OptimizerLRSchedulerConfig:
        # Named parameters: Shampoo names the offending parameter in its messages.
        optimizer = self.optimizer_factory(self.named_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosine) and scheduler.total_steps is None:
            scheduler.set_total_steps(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        loss = F.cross_entropy(self(inputs).flatten(0, -2), targets.flatten())
        self.log("train_loss", loss, prog_bar=True)
        # The rate this step used (first param group), so a schedule shows in the logs.
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        logits = self(inputs)
        # sync_dist: under DDP every rank sees a different shard of the validation set.
        val_loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten())
        self.log("val_loss", val_loss, prog_bar=True, sync_dist=True)
        self.log_val_metrics(logits, targets)

    def log_val_metrics(self, logits: Tensor, targets: Tensor) -> None:
        raise NotImplementedError


class CharTransformer(_RecipeModule):
    """A small pre-norm causal transformer over bytes.

    Args:
        vocab_size: number of token values (256 for bytes).
        context: longest sequence (size of the learned position table).
        d_model: width of the residual stream.
        n_heads: attention heads per layer.
        n_layers: transformer layers.
        dropout: dropout in attention and feed-forward blocks.
        optimizer: builds the optimizer from the named parameters.
        scheduler: builds the learning-rate schedule from the optimizer (stepped every optimizer step);
            None: a constant rate.
    """

    throughput_unit = "tokens"

    def __init__(
        self,
        vocab_size: int = 256,
        context: int = 128,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 2,
        dropout: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(context, d_model)
        for table in (self.embed, self.position):
            nn.init.normal_(table.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, 4 * d_model, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.val_ppl = Perplexity()
        self.val_acc = MulticlassAccuracy(num_classes=vocab_size, average="micro")

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits ``(batch, time, vocab)`` of byte ids ``(batch, time)``."""
        length = tokens.shape[1]
        hidden = self.embed(tokens) + self.position.weight[:length]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        hidden = self.blocks(hidden, mask=mask, is_causal=True)
        return self.head(self.norm(hidden))

    def log_val_metrics(self, logits: Tensor, targets: Tensor) -> None:
        self.val_ppl(logits, targets)
        self.val_acc(logits.flatten(0, 1), targets.flatten())
        self.log_dict({"val_ppl": self.val_ppl, "val_acc": self.val_acc}, prog_bar=True)


class DigitsMLP(_RecipeModule):
    """A GELU multilayer perceptron classifier.

    Args:
        num_features: input size (64 pixels for the 8×8 digits).
        num_classes: number of classes.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        optimizer: builds the optimizer from the named parameters.
        scheduler: builds the learning-rate schedule from the optimizer (stepped every optimizer step);
            None: a constant rate.
    """

    def __init__(
        self,
        num_features: int = 64,
        num_classes: int = 10,
        hidden: int = 128,
        depth: int = 2,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        layers: list[nn.Module] = []
        width = num_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(batch, classes)`` of flattened images ``(batch, features)``."""
        return self.net(images)

    def log_val_metrics(self, logits: Tensor, targets: Tensor) -> None:
        self.val_acc(logits, targets)
        self.log("val_acc", self.val_acc, prog_bar=True)
