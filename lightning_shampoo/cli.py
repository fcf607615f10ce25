"""The ``lightning-shampoo`` command: :class:`~lightning.pytorch.cli.LightningCLI` over recipe YAMLs.

A recipe chooses model, data, optimizer, callbacks and trainer with ``class_path``/``init_args``::

    lightning-shampoo fit --config recipes/char_lm_shampoo.yaml

After ``fit`` it prints a summary of the run (final loss, validation metrics, throughput, Shampoo's
refresh counters). ``--twin OTHER.yaml`` (or ``twin:`` in the recipe, relative to the recipe's folder)
then trains that recipe with the same command-line overrides (e.g. the AdamW twin) and summarises both;
``--plot FILE.png`` draws the training-loss curves of all runs in one figure.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse.typing import Path_fr
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.types import STEP_OUTPUT
from typing_extensions import override

from .optimizer import Shampoo

_SMOOTHING = 0.9  # EMA factor of the plotted loss curves
_FINAL_WINDOW = 10  # steps averaged into the reported final loss


class RunReport(Callback):
    """Records one fit: the loss of every optimizer step, training throughput and Shampoo's counters.

    The loss of a step is the sum of its micro-batches' ``outputs["loss"]``, which Lightning has already
    divided by ``accumulate_grad_batches``: the mean loss of the step's batches. Throughput counts the
    elements of the batch's last entry (the targets: one per sample, or one per token) per second spent in
    training batches; the module's ``throughput_unit`` attribute names them.
    """

    def __init__(self) -> None:
        self.label = ""
        self.unit = "samples"
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.items = 0
        self.seconds = 0.0
        self.final_metrics: dict[str, float] = {}
        self.shampoo: dict[str, float] = {}
        self._step_losses: list[torch.Tensor] = []
        self._pending: torch.Tensor | float = 0.0
        self._batch_started = 0.0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.label = " + ".join(type(opt).__name__ for opt in trainer.optimizers)
        self.unit = getattr(pl_module, "throughput_unit", "samples")

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_started = time.perf_counter()

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.seconds += time.perf_counter() - self._batch_started
        self.items += batch[-1].numel()
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._pending = self._pending + loss.detach()  # no host sync: converted once at the end
        if trainer.global_step > (self.steps[-1] if self.steps else 0):
            self.steps.append(trainer.global_step)
            self._step_losses.append(torch.as_tensor(self._pending, dtype=torch.float32))
            self._pending = 0.0

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.losses = torch.stack(self._step_losses).cpu().tolist() if self._step_losses else []
        self.final_metrics = {
            name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1
        }
        counters: dict[str, float] = {}
        for optimizer in trainer.optimizers:
            if isinstance(optimizer, Shampoo):
                for name in ("refreshes", "roots_rejected"):
                    counters[name] = counters.get(name, 0.0) + optimizer.metrics()[name]
        self.shampoo = counters

    def summary(self) -> str:
        """One line: steps, final training loss, validation metrics, throughput, refreshes."""
        parts = [f"{self.label or 'run'}: {self.steps[-1] if self.steps else 0} steps"]
        if self.losses:
            window = self.losses[-_FINAL_WINDOW:]
            parts.append(
                f"final train loss {sum(window) / len(window):.4f} (mean of last {len(window)} steps)"
            )
        parts += [
            f"{name} {value:.4f}"
            for name, value in sorted(self.final_metrics.items())
            if name.startswith("val")
        ]
        if self.seconds > 0:
            parts.append(f"{self.items / self.seconds:,.0f} {self.unit}/s")
        if self.shampoo:
            refreshes, rejected = self.shampoo["refreshes"], self.shampoo["roots_rejected"]
            parts.append(f"{refreshes:.0f} refreshes ({rejected:.0f} roots rejected)")
        return ", ".join(parts)


def plot_losses(reports: Sequence[RunReport], path: str | Path) -> None:
    """Training loss per optimizer step of every run (raw, faint; EMA-smoothed, solid) in one PNG."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # matplotlib is optional (the `test` and `bench` extras)
        raise ImportError("plotting the loss curves needs matplotlib: pip install matplotlib") from error
    figure = Figure(figsize=(7.0, 4.0))
    axes = figure.add_subplot()
    for report in reports:
        (raw,) = axes.plot(report.steps, report.losses, alpha=0.25, linewidth=0.8)
        axes.plot(report.steps, _ema(report.losses, _SMOOTHING), color=raw.get_color(), label=report.label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def _ema(values: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average, so the curve starts at the first value."""
    out, average = [], 0.0
    for t, value in enumerate(values, start=1):
        average = beta * average + (1.0 - beta) * value
        out.append(average / (1.0 - beta**t))
    return out


class ShampooCLI(LightningCLI):
    """:class:`LightningCLI` in subclass mode (model, data, optimizer by ``class_path``) that records a
    :class:`RunReport` of the fit and accepts ``--twin`` and ``--plot``."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        self.report = RunReport()
        defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        callbacks = defaults.get("callbacks", [])
        defaults["callbacks"] = [*(callbacks if isinstance(callbacks, list) else [callbacks]), self.report]
        kwargs["trainer_defaults"] = defaults
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(args=args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--twin",
            type=Path_fr | None,
            default=None,
            help="Recipe YAML to train after this one with the same command-line overrides (e.g. the AdamW "
            "twin); in a recipe file, relative to that file's folder.",
        )
        parser.add_argument(
            "--plot",
            type=str | None,
            default=None,
            help="Write the training-loss curves of the run(s) to this PNG.",
        )


def twin_args(args: Sequence[str], twin: str) -> list[str]:
    """The twin's command line: the first ``--config`` replaced by ``twin``, every other argument kept."""
    out, rest = [], iter(args)
    replaced = False
    for arg in rest:
        name, has_value, _ = arg.partition("=")
        if not replaced and name in ("--config", "-c"):
            if not has_value:
                next(rest, None)
            out += ["--config", twin]
            replaced = True
        else:
            out.append(arg)
    if not replaced:
        raise ValueError(
            "a twin run replaces this run's recipe: give the recipe with --config (e.g. fit --config "
            "recipes/char_lm_shampoo.yaml --twin recipes/char_lm_adamw.yaml)"
        )
    return out


def run(args: Sequence[str]) -> list[RunReport]:
    """Runs the command line ``args``; for ``fit``, returns the reports of the recipe and its twin."""
    args = list(args)
    cli = ShampooCLI(args=args)
    if cli.subcommand != "fit":
        return []
    config = cli.config["fit"]
    reports = [cli.report]
    if config.twin is not None:
        reports.append(ShampooCLI(args=twin_args(args, config.twin.absolute)).report)
    if cli.trainer.is_global_zero:
        for report in reports:
            print(report.summary())
        if config.plot:
            plot_losses(reports, config.plot)
            print(f"loss curves: {config.plot}")
    return reports


def main() -> None:
    """Entry point of the ``lightning-shampoo`` console script."""
    run(sys.argv[1:])
