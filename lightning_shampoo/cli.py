"""The ``lightning-shampoo`` command: :class:`~lightning.pytorch.cli.LightningCLI` over recipe YAMLs.

A recipe chooses model, data, optimizer, schedule, callbacks and trainer with ``class_path``/``init_args``::

    lightning-shampoo fit --config recipes/char_lm_shampoo.yaml

After ``fit`` it prints a summary of the run (final loss, validation metrics, throughput, Shampoo's
refresh counters). ``--twin OTHER.yaml`` (or ``twin:`` in the recipe, relative to the recipe's folder)
then trains that recipe with the same command-line overrides (e.g. the AdamW twin) and summarises both;
``--plot`` draws the training-loss curves of all runs in one figure (``true``: ``loss.png`` in the first
run's log folder, so every run keeps its own; or a file name).

The recipe modules take their optimizer and schedule by dependency injection (``model.init_args.optimizer``
/ ``.scheduler``); the top-level ``--optimizer`` / ``--lr_scheduler`` of LightningCLI are routed into them.
The console script (:func:`main`) also arranges CPU threads (:mod:`._cpu`); :func:`run` leaves the
process's threads and environment alone.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import DefaultHelpFormatter, Namespace
from jsonargparse.typing import Path_fr
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator, XLAAccelerator
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.types import STEP_OUTPUT
from typing_extensions import override

from . import _cpu, register_strategies
from ._extras import INSTALL_RECIPES, MissingExtra, check_requirements, installed
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
    from matplotlib.figure import Figure  # optional (the `recipes` extra): run() checks it before training
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


def recipes_folder() -> Path:
    """The folder of the recipe YAMLs: ``lightning_shampoo/recipes`` as installed (a clone's ``recipes/``
    under an editable install)."""
    from . import recipes

    return Path(recipes.__file__).parent


def recipe_names(folder: Path) -> list[str]:
    """The Lightning recipes of ``folder``: its YAMLs with a model (it also holds e.g. Accelerate configs)."""
    return sorted(p.name for p in folder.glob("*.yaml") if "model" in (yaml.safe_load(p.read_text()) or {}))


def _description() -> str:
    folder = recipes_folder()
    return f"""Train with Shampoo through LightningCLI: options come from a recipe YAML or the command line.

Recipes (YAML files in {folder}):
  {", ".join(recipe_names(folder))}
The main job (a byte-level transformer on the Python standard library's source, then its AdamW twin):
  lightning-shampoo fit --config {folder}/char_lm_shampoo.yaml
  (in a clone of the repository: --config recipes/char_lm_shampoo.yaml)

  --twin FILE|null   after the recipe, train FILE (e.g. the AdamW twin) with the same overrides; null: skip
  --plot true|FILE|null  draw the runs' training losses: true = loss.png in the first run's log folder
  --optimizer / --lr_scheduler  replace the recipe's optimizer / schedule (the schedule steps per
                     optimizer step), e.g. --lr_scheduler CosineAnnealingLR --lr_scheduler.T_max 500
  --trainer.max_steps N  shorten a run;  `lightning-shampoo fit --help` lists every option

On CPU the command sets OMP_WAIT_POLICY=PASSIVE where other processes keep the machine busy (1-min
load average >= 1; on a free machine OpenMP's default is faster) and splits the cores between training
and Shampoo's refresh worker, unless OMP_WAIT_POLICY, OMP_NUM_THREADS or refresh_threads are set.
"""


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the description's lines kept as written."""


class ShampooCLI(LightningCLI):
    """:class:`LightningCLI` in subclass mode (model, data, optimizer by ``class_path``) that records a
    :class:`RunReport` of the fit and accepts ``--twin`` and ``--plot``.

    Args:
        args: the command line (without the program name); None: ``sys.argv[1:]``.
        configure_cpu: when training on CPU, set torch's thread count and Shampoo's ``refresh_threads``
            (:func:`configure_cpu_threads`) unless set by the user; the console script passes True.
        kwargs: passed to :class:`LightningCLI`.
    """

    def __init__(self, args: list[str] | None = None, *, configure_cpu: bool = False, **kwargs: Any) -> None:
        self.report = RunReport()
        self.configure_cpu = configure_cpu
        defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        callbacks = defaults.get("callbacks", [])
        defaults["callbacks"] = [*(callbacks if isinstance(callbacks, list) else [callbacks]), self.report]
        kwargs["trainer_defaults"] = defaults
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        register_strategies()  # --trainer.strategy shampoo_ddp / shampoo_fsdp
        help_kwargs = {"description": _description(), "formatter_class": _HelpFormatter}
        kwargs.setdefault("parser_kwargs", {**help_kwargs, "fit": help_kwargs})
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
            type=bool | str | None,
            default=None,
            help="Draw the training-loss curves of the run(s): true writes loss.png into the first run's log "
            "folder (one per run), a file name writes that file, null draws nothing. Needs matplotlib.",
        )

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for key in ("model", "data"):  # a missing optional dependency: said before anything is built
            cls = _class_of(config.get(key))
            if cls is not None:
                check_requirements(cls)
        route_optimizer_and_scheduler(config)
        if config.get("plot") not in (None, False) and not installed("matplotlib"):
            # Before training, not after it: the plot is a by-product, the run goes on without it.
            warnings.warn(f"no loss plot: --plot needs matplotlib ({INSTALL_RECIPES})", stacklevel=1)
            config.plot = None
        if self.configure_cpu:
            configure_cpu_threads(config)


def route_optimizer_and_scheduler(config: Namespace) -> None:
    """Moves the top-level ``optimizer`` / ``lr_scheduler`` into the model's ``optimizer`` / ``scheduler``
    arguments, where the model takes them (the recipe modules do).

    LightningCLI would instead replace the model's ``configure_optimizers`` when ``--optimizer`` is given
    and ignore ``--lr_scheduler`` without it; routed, the model builds both (named parameters, a schedule
    stepped per optimizer step) whichever of them is given. A model without those arguments keeps
    LightningCLI's behaviour, except that a schedule without an optimizer is an error, not ignored.
    """
    model = config.get("model")
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    for top, own in (("optimizer", "optimizer"), ("lr_scheduler", "scheduler")):
        value = config.get(top)
        if value is None:
            continue
        if init_args is not None and own in init_args:
            init_args[own] = value
            config[top] = None
        elif top == "lr_scheduler" and config.get("optimizer") is None:
            raise ValueError(
                f"--lr_scheduler needs --optimizer with this model ({model.get('class_path', model)} takes "
                "no `scheduler` argument): give both, or build the schedule in its configure_optimizers"
            )


def configure_cpu_threads(config: Namespace) -> _cpu.ThreadPlan | None:
    """When the subcommand's ``config`` trains on CPU: sets torch's thread count, also as
    ``OMP_NUM_THREADS`` (which Lightning's launcher and the processes it starts keep), and, for a Shampoo
    optimizer refreshing in the background without ``refresh_threads``, fills that in
    (:func:`._cpu.plan_threads`). Returns the plan; None when not on CPU.
    """
    trainer = config.get("trainer") or Namespace()
    if not _trains_on_cpu(trainer.get("accelerator", "auto")):
        return None
    devices = trainer.get("devices", "auto")
    processes = 1 if devices == "auto" else CPUAccelerator.parse_devices(devices)
    shampoo = _shampoo_args(config)
    background = shampoo is not None and shampoo.get("refresh", "sync") != "sync"
    plan = _cpu.plan_threads(torch.get_num_threads(), processes, background)
    if shampoo is not None and plan.refresh is not None and shampoo.get("refresh_threads") is None:
        shampoo["refresh_threads"] = plan.refresh
    if plan.training is not None:
        torch.set_num_threads(plan.training)
        os.environ["OMP_NUM_THREADS"] = str(plan.training)
    rank_zero_info(
        f"lightning-shampoo: CPU training with {torch.get_num_threads()} torch thread(s) per process"
        f"{_worker_threads(shampoo if background else None)}, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')} (set OMP_NUM_THREADS, OMP_WAIT_POLICY or the "
        "optimizer's refresh_threads to choose)"
    )
    return plan


def _worker_threads(shampoo: Namespace | None) -> str:
    """How a background refresh's worker computes, for the CLI's message ("" without one)."""
    if shampoo is None:
        return ""
    if shampoo.get("refresh_threads") is None:
        return ", Shampoo's refresh worker on the cores they leave (at least one thread)"
    return f" + {shampoo.refresh_threads} for Shampoo's refresh worker"


def _trains_on_cpu(accelerator: Any) -> bool:
    """Whether Lightning puts the trainer's ``accelerator`` argument on the CPU."""
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    return not any(kind.is_available() for kind in (CUDAAccelerator, MPSAccelerator, XLAAccelerator))


def _class_of(spec: Any) -> type | None:
    """The class a ``class_path`` spec names (None for anything else)."""
    if not isinstance(spec, Namespace) or not isinstance(spec.get("class_path"), str):
        return None
    module, _, name = spec.class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    return cls if isinstance(cls, type) else None


def _shampoo_args(config: Namespace) -> Namespace | None:
    """The ``init_args`` of the model's optimizer if it is a :class:`Shampoo`, else None."""
    model = config.get("model")
    optimizer = model.get("init_args", Namespace()).get("optimizer") if isinstance(model, Namespace) else None
    cls = _class_of(optimizer)
    if cls is None or not issubclass(cls, Shampoo):
        return None
    if optimizer.get("init_args") is None:
        optimizer.init_args = Namespace()
    return optimizer.init_args


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


def plot_path(plot: bool | str | None, log_dir: str | None) -> Path | None:
    """Where ``--plot`` draws: ``true`` → ``loss.png`` in the run's log folder, a name → that file."""
    if plot is None or plot is False:
        return None
    if plot is True:
        return Path(log_dir or ".") / "loss.png"
    return Path(plot)


def run(args: Sequence[str], *, configure_cpu: bool = False) -> list[RunReport]:
    """Runs the command line ``args``; for ``fit``, returns the reports of the recipe and its twin.

    ``configure_cpu``: see :class:`ShampooCLI` (the console script's threading; off for library use).
    """
    args = list(args)
    with warnings.catch_warnings():
        # The console script passes sys.argv[1:] as `args` (the twin needs them as a list): not a mistake.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = ShampooCLI(args=args, configure_cpu=configure_cpu)
        if cli.subcommand != "fit":
            return []
        config = cli.config["fit"]
        log_dir = cli.trainer.log_dir
        reports = [cli.report]
        if config.twin is not None:
            twin = ShampooCLI(args=twin_args(args, config.twin.absolute), configure_cpu=configure_cpu)
            reports.append(twin.report)
    if cli.trainer.is_global_zero:
        for report in reports:
            print(report.summary())
        path = plot_path(config.plot, log_dir)
        if path is not None:
            plot_losses(reports, path)
            print(f"loss curves: {path}")
    return reports


def main() -> None:
    """Runs ``sys.argv`` with the console script's CPU threading (see ``lightning_shampoo.__main__``); a
    missing optional dependency ends it with the message saying what to install, not a traceback."""
    try:
        run(sys.argv[1:], configure_cpu=True)
    except MissingExtra as error:
        sys.exit(f"lightning-shampoo: {error}")
