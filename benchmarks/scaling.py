"""Figure 4: scaling with data-parallel ranks, per-rank factor memory, refresh time and step time.

Two spawned processes with a gloo group (CPU), one intra-op thread each, train the same model three
times, one after the other: rank 0 alone (a group of one, Shampoo ``distribute="sharded"``, rank 1 waits),
then both ranks with DDP and Shampoo sharded by parameter owner, then both replicated (every rank does
all the work). Per rank:

- factor memory: bytes of the Kronecker factors and their roots it keeps;
- refresh time: seconds of root computation per refresh (the optimizer's ``wait_s`` in sync mode), and
  its CPU time (a refresh step's thread CPU time minus a plain step's): on a machine whose cores are
  shared (2 ranks on 2 cores, other jobs), wall time at 2 ranks also counts waiting for a core, CPU time
  counts the work only;
- step time: median ``optimizer.step()`` seconds over steps without a refresh (the collective included).

Goals (issue 4): ≥ 1.8× less factor memory and refresh time per rank at 2 ranks (sharded) than at 1,
and the sharded step no slower than the replicated one. The most loaded rank decides each figure.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from . import report
from .harness import FigureResult, Settings, Table, goal_verdict, progress
from .memory import state_bytes

NAME = "scaling"
FACTOR_GOAL = 1.8  # per-rank factor memory and refresh time, 1 rank over 2 ranks sharded
STEP_GOAL = 1.0  # sharded step time over replicated step time, at 2 ranks
WORLD_SIZE = 2
# Label → (ranks, Shampoo's ``distribute``), in the order they run.
RUNS = {
    "1 rank": (1, "sharded"),
    "2 ranks, sharded": (2, "sharded"),
    "2 ranks, replicated": (2, "replicated"),
}


@dataclass(frozen=True)
class Config:
    """An MLP of ``layers`` square ``width`` layers (equal parameters, so ownership can balance)."""

    width: int
    layers: int
    block_size: int
    batch: int
    frequency: int  # steps between refreshes
    warmup: int
    steps: int

    @property
    def description(self) -> str:
        return (
            f"MLP {self.layers}×Linear({self.width}, {self.width}), block_size {self.block_size}, "
            f"batch {self.batch}, refresh every {self.frequency} steps, 1 thread per rank"
        )


QUICK = Config(width=64, layers=4, block_size=32, batch=32, frequency=4, warmup=2, steps=12)
FULL = Config(width=512, layers=8, block_size=256, batch=256, frequency=5, warmup=3, steps=30)


def _model(config: Config) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(config.layers):
        layers += [nn.Linear(config.width, config.width), nn.Tanh()]
    return nn.Sequential(*layers)


def _measure(rank: int, ranks: int, group: Any, config: Config, distribute: str) -> dict[str, Any]:
    """Train ``config`` on ``ranks`` ranks of ``group``; this rank's memory, refresh and step figures."""
    from lightning_shampoo import Shampoo

    model = _model(config)
    trained = nn.parallel.DistributedDataParallel(model, process_group=group) if ranks > 1 else model
    optimizer = Shampoo(
        model.parameters(),
        lr=1e-3,
        block_size=config.block_size,
        start_preconditioning_step=1,
        precondition_frequency=config.frequency,
        distribute=distribute,
        process_group=group,
    )
    generator = torch.Generator().manual_seed(1)
    share = config.batch // ranks
    plain, plain_cpu, refresh_cpu, wait_before = [], [], [], 0.0
    for step in range(1, config.warmup + config.steps + 1):
        x = torch.randn(config.batch, config.width, generator=generator)[rank * share : (rank + 1) * share]
        optimizer.zero_grad()
        trained(x).square().mean().backward()
        if step == config.warmup + 1:
            wait_before = optimizer.metrics()["wait_s"]
        start, start_cpu = time.perf_counter(), time.thread_time()
        optimizer.step()
        elapsed, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
        if step > config.warmup:
            if optimizer.policy.due(step):
                refresh_cpu.append(cpu)
            else:
                plain.append(elapsed)
                plain_cpu.append(cpu)
    optimizer.close()
    return {
        "rank": rank,
        "factor_bytes": sum(state_bytes(optimizer).get(kind, 0) for kind in ("factors", "roots")),
        "refresh_s": (optimizer.metrics()["wait_s"] - wait_before) / len(refresh_cpu),
        "refresh_cpu_s": statistics.fmean(refresh_cpu) - statistics.median(plain_cpu),
        "step_s": statistics.median(plain),
        "step_cpu_s": statistics.median(plain_cpu),
        "refreshes_timed": len(refresh_cpu),
    }


def _rank_main(rank: int, port: int, config: Config, out: str) -> None:
    """One spawned rank: every entry of :data:`RUNS` in turn; its results go to ``out/rank{rank}.json``."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(minutes=5))
    try:
        alone = dist.new_group([0])  # collective: every rank creates it
        results = {}
        for label, (ranks, distribute) in RUNS.items():
            if rank < ranks:
                results[label] = _measure(rank, ranks, alone if ranks == 1 else None, config, distribute)
            dist.barrier()  # the next run starts on both ranks at once, after this one ended everywhere
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(config: Config) -> dict[str, list[dict[str, Any]]]:
    """Per run label, every participating rank's figures, from two spawned processes with a gloo group."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(_free_port(), config, out), nprocs=WORLD_SIZE, join=True)
        per_rank = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    return {label: [results[label] for results in per_rank if label in results] for label in RUNS}


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per figure: each run's most loaded rank, 1 rank over sharded, and sharded over replicated."""
    out = {}
    for key in ("factor_bytes", "refresh_s", "refresh_cpu_s", "step_s", "step_cpu_s"):
        worst = {label: max(r[key] for r in ranks) for label, ranks in runs.items()}
        sharded = worst["2 ranks, sharded"]
        out[key] = {**worst, "one_over_sharded": worst["1 rank"] / sharded,
                    "sharded_over_replicated": sharded / worst["2 ranks, replicated"]}
    return out


RATIO_NAMES = {"one_over_sharded": "1 rank / sharded", "sharded_over_replicated": "sharded / replicated"}


@dataclass(frozen=True)
class Goal:
    """``ratio`` (a key of :data:`RATIO_NAMES`) at most or at least ``target``."""

    ratio: str
    target: float
    at_most: bool

    def verdict(self, figures: dict[str, float]) -> str:
        sign = "≤" if self.at_most else "≥"
        verdict = goal_verdict(figures[self.ratio], self.target, at_most=self.at_most)
        return f"{RATIO_NAMES[self.ratio]} {sign}{self.target:g}: {verdict}"


# Table rows: key in :func:`summary`, label, unit scale, goal.
ROWS: tuple[tuple[str, str, float, Goal | None], ...] = (
    ("factor_bytes", "factor memory MiB", 2.0**-20, Goal("one_over_sharded", FACTOR_GOAL, at_most=False)),
    ("refresh_s", "refresh s (wall)", 1.0, Goal("one_over_sharded", FACTOR_GOAL, at_most=False)),
    ("refresh_cpu_s", "refresh s (CPU)", 1.0, Goal("one_over_sharded", FACTOR_GOAL, at_most=False)),
    ("step_s", "step s (wall)", 1.0, Goal("sharded_over_replicated", STEP_GOAL, at_most=True)),
    ("step_cpu_s", "step s (CPU)", 1.0, None),
)


def _table(figures: dict[str, dict[str, float]], config: Config) -> Table:
    table = Table(f"Per rank (the most loaded rank): {config.description}",
                  ["measure", *RUNS, *RATIO_NAMES.values(), "goal"])
    for key, label, scale, goal in ROWS:
        row = figures[key]
        verdict = goal.verdict(row) if goal else ""
        values = [scale * row[run] for run in RUNS]
        table.rows.append([label, *values, *(row[ratio] for ratio in RATIO_NAMES), verdict])
    table.notes += [
        f"{config.steps} timed steps after {config.warmup} warm-up steps, sync refresh. refresh: per "
        "refresh; step: median over steps without a refresh, the sharded parameters' all-gather included.",
        "Two ranks share two cores with whatever else runs on the machine: wall times also count waiting "
        "for a core; CPU times (the training thread's) count the work only.",
    ]
    return table


def run(settings: Settings) -> FigureResult:
    config = QUICK if settings.quick else FULL
    progress(NAME, f"{config.description}: {', '.join(RUNS)} in {WORLD_SIZE} spawned gloo processes")
    runs = measure(config)
    figures = summary(runs)
    for label in RUNS:
        progress(NAME, f"{label}: factor memory {figures['factor_bytes'][label] / 2**20:.1f} MiB, refresh "
                       f"{figures['refresh_s'][label]:.3f} s, step {figures['step_s'][label]:.3f} s per rank")
    result = FigureResult(NAME, "Scaling: per-rank factor memory, refresh and step time at 1 and 2 ranks")
    result.tables.append(_table(figures, config))
    result.plots.append(_plot(runs, settings))
    result.data = {"config": {**asdict(config), "description": config.description}, "per_rank": runs,
                   "summary": figures}
    return result


def _plot(runs: dict[str, list[dict[str, Any]]], settings: Settings) -> str:
    fig, axes = report.subplots(1, 3, width=13.0, height=4.0)
    panels = (("factor_bytes", 2.0**-20, "factor memory per rank (MiB)"),
              ("refresh_cpu_s", 1.0, "refresh CPU time per rank (s)"),
              ("step_s", 1.0, "step time per rank (s)"))
    for ax, (key, scale, ylabel) in zip(axes, panels, strict=True):
        x = 0
        for color, (label, ranks) in enumerate(runs.items()):
            positions = [x + i for i in range(len(ranks))]
            ax.bar(positions, [scale * r[key] for r in ranks], color=f"C{color}", label=label)
            ax.bar_label(ax.containers[-1], labels=[f"rank {r['rank']}" for r in ranks], fontsize=7)
            x += len(ranks) + 1
        ax.set_xticks([])
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    return report.save(fig, settings.out_dir, f"{NAME}.png")
