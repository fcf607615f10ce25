"""Figure 2: steps and wall-clock to a target loss, Shampoo vs AdamW, each with a learning-rate sweep.

Two tasks: the classification recipe (scikit-learn's digits, an MLP) and the char-LM recipe (its
``CharTransformer`` on the standard library's source text, ``StdlibText``). Every (optimizer, lr) pair
trains from the same initialisations on the same minibatch order for each seed. The training loss is
evaluated every ``eval_every`` steps (not timed) on the task's training evaluation set (digits: the
whole training split; char-LM: fixed training windows); a run reaches the target at the first
evaluation at or below it, and its wall-clock is the summed time of its training iterations up to then.
Per pair the median over seeds is reported (∞ when a seed never gets there); the best pair of each
optimizer is the one with the fewest median steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from lightning_shampoo.recipes import CharTransformer, StdlibText

from . import optimizers, report
from .harness import FigureResult, Settings, Table, goal_verdict, median, progress, synchronize
from .models import Batch, mlp, next_token_loss
from .optimizers import OptimizerSpec

NAME = "convergence"
# Issue 6's goals for the best Shampoo against the best AdamW.
STEPS_GOAL = 1.3
WALL_CLOCK_GOAL = 1.15


@dataclass(frozen=True)
class ConvergenceTask:
    """A training problem with a target loss on its training split."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    sample: Callable[[torch.Generator], Batch]
    loss: Callable[[nn.Module, Batch], Tensor]
    train_eval: Batch  # the training evaluation set the target is judged on
    heldout_eval: Batch
    target: float
    max_steps: int
    eval_every: int
    seeds: int
    lrs: dict[str, tuple[float, ...]]  # the sweep of each optimizer family
    shampoo: dict[str, Any] = field(default_factory=dict)  # Shampoo's settings besides lr

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Batch) -> float:
        return float(self.loss(model, data))

    def train_loss(self, model: nn.Module) -> float:
        return self.evaluate(model, self.train_eval)

    def heldout_loss(self, model: nn.Module) -> float:
        return self.evaluate(model, self.heldout_eval)

    def sweeps(self) -> dict[str, list[OptimizerSpec]]:
        return {
            "AdamW": [optimizers.adamw(lr) for lr in self.lrs["AdamW"]],
            "Shampoo": [optimizers.shampoo(lr=lr, **self.shampoo) for lr in self.lrs["Shampoo"]],
        }


def digits_task(quick: bool, device: torch.device) -> ConvergenceTask:
    """scikit-learn's digits (8×8 images, 10 classes), MLP 64-128-128-10, minibatches of 128."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    x = (torch.tensor(images, dtype=torch.float32) / 16.0)[order].to(device)
    y = torch.tensor(labels)[order].to(device)
    n_train = int(0.8 * len(y))
    train, heldout = (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
    batch = 128

    def sample(gen: torch.Generator) -> Batch:
        index = torch.randint(0, n_train, (batch,), generator=gen).to(device)
        return train[0][index], train[1][index]

    def loss(model: nn.Module, data: Batch) -> Tensor:
        return F.cross_entropy(model(data[0]), data[1])

    lrs = (3e-3, 3e-2) if quick else (1e-3, 3e-3, 1e-2, 3e-2)
    return ConvergenceTask(
        name="digits",
        description=f"sklearn digits, MLP 64-128-128-10, batch {batch}, {n_train} training images",
        build=lambda: mlp((64, 128, 128, 10)).to(device),
        sample=sample,
        loss=loss,
        train_eval=train,
        heldout_eval=heldout,
        target=0.3 if quick else 0.01,
        max_steps=40 if quick else 400,
        eval_every=5,
        seeds=1 if quick else 3,
        lrs={"AdamW": lrs, "Shampoo": lrs},
        shampoo={"precondition_frequency": 10},
    )


def windows(dataset: Dataset, index: Tensor, device: torch.device) -> Batch:
    """The (inputs, targets) windows ``dataset[i]`` for ``i`` in ``index``, stacked into one batch."""
    inputs, targets = zip(*(dataset[int(i)] for i in index), strict=True)
    return torch.stack(inputs).to(device), torch.stack(targets).to(device)


def char_lm_task(quick: bool, device: torch.device) -> ConvergenceTask:
    """The char-LM recipe's model and data: ``CharTransformer`` (2 layers, d_model 128, 4 heads) on
    windows of 64 bytes of the standard library's source, minibatches of 16 random windows.

    The training loss is evaluated on 64 fixed training windows (the split has ~15,000). Quick: a
    1-layer d_model-32 model on a 100 kB corpus, windows of 16 bytes.
    """
    context, batch, max_bytes = (16, 8, 100_000) if quick else (64, 16, 1_000_000)
    d_model, heads, layers = (32, 2, 1) if quick else (128, 4, 2)
    data = StdlibText(context=context, batch_size=batch, max_bytes=max_bytes)
    data.setup("fit")
    train, heldout = data.train_set, data.val_set
    evaluation = 64
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:evaluation]
    train_eval = windows(train, chosen, device)
    heldout_eval = windows(heldout, torch.arange(min(evaluation, len(heldout))), device)

    def sample(gen: torch.Generator) -> Batch:
        return windows(train, torch.randint(0, len(train), (batch,), generator=gen), device)

    def build() -> nn.Module:
        model = CharTransformer(StdlibText.vocab_size, context, d_model, heads, layers)
        return model.to(device)

    # Each grid brackets its optimizer's best lr (probed at 300 steps: AdamW 1e-3, Shampoo 1e-3 to 3e-3).
    adamw_lrs, shampoo_lrs = ((1e-3, 1e-2),) * 2 if quick else ((3e-4, 1e-3, 3e-3), (1e-3, 3e-3, 1e-2))
    return ConvergenceTask(
        name="char_lm",
        description=(f"char-LM recipe: CharTransformer {layers} layers, d_model {d_model}, {heads} heads on "
                     f"{max_bytes // 1000} kB of stdlib source, windows of {context} bytes, batch {batch}"),
        build=build,
        sample=sample,
        loss=next_token_loss,
        train_eval=train_eval,
        heldout_eval=heldout_eval,
        target=3.5 if quick else 2.25,
        max_steps=40 if quick else 250,
        eval_every=5 if quick else 10,
        seeds=1,
        lrs={"AdamW": adamw_lrs, "Shampoo": shampoo_lrs},
        # Sync refresh every 25 steps: 10 refreshes in the run. Probed at lr 3e-3 against every 10 steps
        # (10 fewer steps to loss 2.2, 10% more seconds) and async refresh (its one-period lag cost 40-70
        # more steps; its worker shares the two cores with training: seconds improved by 4% at best).
        shampoo={"precondition_frequency": 25},
    )


TASKS: tuple[Callable[[bool, torch.device], ConvergenceTask], ...] = (digits_task, char_lm_task)


@dataclass
class Trajectory:
    """One training run: evaluated (step, cumulative train seconds, loss) and where it hit the target."""

    points: list[tuple[int, float, float]]
    steps_to_target: float
    seconds_to_target: float
    heldout_loss: float


def train(task: ConvergenceTask, spec: OptimizerSpec, seed: int, device: torch.device) -> Trajectory:
    torch.manual_seed(seed)
    model = task.build()
    assert spec.factory is not None
    optimizer = spec.factory(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    points: list[tuple[int, float, float]] = []
    elapsed = 0.0
    reached = (math.inf, math.inf)
    for step in range(1, task.max_steps + 1):
        batch = task.sample(gen)
        synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
        optimizer.step()
        synchronize(device)
        elapsed += time.perf_counter() - start
        if step % task.eval_every == 0:
            current = task.train_loss(model)
            points.append((step, elapsed, current))
            if current <= task.target and math.isinf(reached[0]):
                reached = (float(step), elapsed)
    optimizers.close(optimizer)
    return Trajectory(points, reached[0], reached[1], task.heldout_loss(model))


def run(settings: Settings) -> FigureResult:
    result = FigureResult(NAME, "Convergence: steps and wall-clock to a target loss vs AdamW")
    for make in TASKS:
        task = make(settings.quick, settings.device)
        progress(NAME, f"{task.description}: target train loss {task.target:g}, ≤{task.max_steps} steps, "
                       f"{task.seeds} seed(s)")
        sweep_table = Table(
            f"{task.name}: learning-rate sweep (median over {task.seeds} seed(s); "
            f"target train loss {task.target:g})",
            ["optimizer", "lr", "steps to target", "seconds to target", "final train loss",
             "final held-out loss"],
        )
        summaries: dict[str, list[dict]] = {}
        curves: dict[str, list[tuple[int, float, float]]] = {}
        for family, specs in task.sweeps().items():
            for spec in specs:
                runs = [train(task, spec, seed, settings.device) for seed in range(task.seeds)]
                summary = {
                    "lr": spec.options["lr"],
                    "steps_to_target": median([r.steps_to_target for r in runs]),
                    "seconds_to_target": median([r.seconds_to_target for r in runs]),
                    "final_train_loss": median([r.points[-1][2] for r in runs]),
                    "final_heldout_loss": median([r.heldout_loss for r in runs]),
                    "options": spec.options,
                }
                summaries.setdefault(family, []).append(summary)
                curves[f"{family} lr {summary['lr']:g}"] = runs[0].points
                sweep_table.rows.append([family, summary["lr"], summary["steps_to_target"],
                                         summary["seconds_to_target"], summary["final_train_loss"],
                                         summary["final_heldout_loss"]])
                progress(NAME, f"{task.name} | {spec.label} lr {summary['lr']:g}: "
                               f"{summary['steps_to_target']:g} steps, "
                               f"{summary['seconds_to_target']:.2f} s to target, "
                               f"final loss {summary['final_train_loss']:.3g}")
        best = {family: min(rows, key=lambda r: (r["steps_to_target"], r["seconds_to_target"]))
                for family, rows in summaries.items()}
        shampoo = ", ".join(f"{key} {value}" for key, value in task.shampoo.items())
        sweep_table.notes.append(
            f"Shampoo: lightning_shampoo defaults with {shampoo}; AdamW: torch defaults, weight_decay 0. "
            "Wall-clock counts training iterations only, not the evaluations."
        )
        result.tables += [sweep_table, _best_table(task, best, summaries)]
        result.data[task.name] = {"description": task.description, "target": task.target, "sweep": summaries,
                                  "best": best}
        result.plots.append(_plot(task, best, curves, settings))
    return result


def _best_table(task: ConvergenceTask, best: dict[str, dict], summaries: dict[str, list[dict]]) -> Table:
    adamw, shampoo = best["AdamW"], best["Shampoo"]
    table = Table(f"{task.name}: best of each sweep",
                  ["measure", "AdamW", "Shampoo", "AdamW / Shampoo", "goal"],
                  notes=["best: the lr with the fewest steps to the target (ties: the fewer seconds)."])
    table.notes += _fastest_note(best, summaries)
    for key, label, goal in (("steps_to_target", "steps to target", STEPS_GOAL),
                             ("seconds_to_target", "seconds to target", WALL_CLOCK_GOAL)):
        ratio = adamw[key] / shampoo[key] if math.isfinite(shampoo[key]) else 0.0
        table.rows.append([label, adamw[key], shampoo[key], ratio,
                           f"≥{goal:g}×: {goal_verdict(ratio, goal, at_most=False)}"])
    table.rows.append(["best lr", adamw["lr"], shampoo["lr"], "", ""])
    return table


def _fastest_note(best: dict[str, dict], summaries: dict[str, list[dict]]) -> list[str]:
    """A note naming each family's fastest lr in seconds, where that is not its best in steps."""
    fastest = {family: min(rows, key=lambda r: r["seconds_to_target"]) for family, rows in summaries.items()}
    if all(fastest[family] is best[family] for family in best):
        return []
    runs = ", ".join(f"{family} lr {row['lr']:g} ({row['seconds_to_target']:.3g} s)"
                     for family, row in fastest.items())
    seconds = [fastest[family]["seconds_to_target"] for family in ("AdamW", "Shampoo")]
    ratio = f"; AdamW / Shampoo {seconds[0] / seconds[1]:.3g}" if math.isfinite(seconds[1]) else ""
    return [f"Fewest seconds to the target instead: {runs}{ratio}."]


def _plot(task: ConvergenceTask, best: dict[str, dict], curves: dict[str, list[tuple[int, float, float]]],
          settings: Settings) -> str:
    fig, (steps_ax, time_ax) = report.subplots(1, 2, width=11.0, height=4.0)
    for family, summary in best.items():
        points = curves[f"{family} lr {summary['lr']:g}"]
        label = f"{family} (lr {summary['lr']:g})"
        steps_ax.plot([p[0] for p in points], [p[2] for p in points], label=label)
        time_ax.plot([p[1] for p in points], [p[2] for p in points], label=label)
    for ax, xlabel in ((steps_ax, "step"), (time_ax, "training seconds")):
        ax.axhline(task.target, color="grey", ls=":", label=f"target {task.target:g}")
        ax.set(yscale="log", xlabel=xlabel, ylabel="training loss",
               title=f"{task.name}: best lr of each (seed 0)")
        ax.legend()
    return report.save(fig, settings.out_dir, f"{NAME}_{task.name}.png")
