"""Scaling with data-parallel ranks: per-rank factor memory, refresh time and step time at 1 and 2 ranks.

The same model trains with DDP on gloo (CPU), one intra-op thread per rank, at world size 1 and 2, with
Shampoo sharded by parameter owner and, at 2 ranks, replicated (every rank does all the work). Per rank:

- factor memory: bytes of the Kronecker factors and their roots it keeps;
- refresh time: seconds of root computation per refresh (the optimizer's ``wait_s`` in sync mode), and
  its CPU time (a refresh step's thread CPU time minus a plain step's): on a machine whose cores are
  shared (2 ranks on 2 cores, other jobs), wall time at 2 ranks also counts waiting for a core, CPU time
  counts the work only;
- step time: median ``optimizer.step()`` seconds over steps without a refresh (the collective included).

Goals (issue 4): ≥ 1.8× less factor memory and refresh time per rank at 2 ranks than at 1, and the
sharded step no slower than the replicated one. Run: ``python -m benchmarks.scaling [--quick]``.
"""

from __future__ import annotations

import argparse
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

FACTOR_GOAL = 1.8  # per-rank factor memory and refresh time, 1 rank over 2 ranks
STEP_GOAL = 1.0  # sharded step time over replicated step time, at 2 ranks


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
            f"batch {self.batch}, refresh every {self.frequency} steps"
        )


QUICK = Config(width=64, layers=4, block_size=32, batch=32, frequency=4, warmup=2, steps=12)
FULL = Config(width=512, layers=8, block_size=256, batch=256, frequency=5, warmup=3, steps=30)


def _model(config: Config) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(config.layers):
        layers += [nn.Linear(config.width, config.width), nn.Tanh()]
    return nn.Sequential(*layers)


def _factor_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for key, value in state.items()
        if key.startswith(("factor_", "root_"))
    )


def _measure(rank: int, world_size: int, port: int, config: Config, distribute: str) -> dict[str, Any]:
    from lightning_shampoo import Shampoo

    model = _model(config)
    trained = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    optimizer = Shampoo(
        model.parameters(),
        lr=1e-3,
        block_size=config.block_size,
        start_preconditioning_step=1,
        precondition_frequency=config.frequency,
        distribute=distribute,
    )
    generator = torch.Generator().manual_seed(1)
    share = config.batch // world_size
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
        "factor_bytes": _factor_bytes(optimizer),
        "refresh_s": (optimizer.metrics()["wait_s"] - wait_before) / len(refresh_cpu),
        "refresh_cpu_s": statistics.fmean(refresh_cpu) - statistics.median(plain_cpu),
        "step_s": statistics.median(plain),
        "step_cpu_s": statistics.median(plain_cpu),
        "refreshes_timed": len(refresh_cpu),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, config: Config, distribute: str, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=5))
    try:
        result = _measure(rank, world_size, port, config, distribute)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _launch(world_size: int, config: Config, distribute: str) -> list[dict[str, Any]]:
    """Every rank's measurements, from ``world_size`` spawned processes with a gloo group."""
    with tempfile.TemporaryDirectory() as out:
        args = (world_size, _free_port(), config, distribute, out)
        mp.spawn(_rank_main, args=args, nprocs=world_size, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world_size)]


def run(quick: bool) -> dict[str, Any]:
    """Measure world size 1 and 2 (sharded and replicated); per-rank figures, ratios and goal verdicts."""
    config = QUICK if quick else FULL
    runs = {
        "1 rank": _launch(1, config, "sharded"),
        "2 ranks, sharded": _launch(2, config, "sharded"),
        "2 ranks, replicated": _launch(2, config, "replicated"),
    }
    one, sharded, replicated = runs["1 rank"][0], runs["2 ranks, sharded"], runs["2 ranks, replicated"]
    # The most loaded rank decides the memory needed and the time taken.
    memory_ratio = one["factor_bytes"] / max(r["factor_bytes"] for r in sharded)
    refresh_ratio = one["refresh_s"] / max(r["refresh_s"] for r in sharded)
    refresh_cpu_ratio = one["refresh_cpu_s"] / max(r["refresh_cpu_s"] for r in sharded)
    step_ratio = max(r["step_s"] for r in sharded) / max(r["step_s"] for r in replicated)
    step_cpu_ratio = max(r["step_cpu_s"] for r in sharded) / max(r["step_cpu_s"] for r in replicated)
    return {
        "config": {**asdict(config), "description": config.description},
        "threads_per_rank": 1,
        "per_rank": runs,
        "factor_memory_ratio": memory_ratio,
        "refresh_time_ratio": refresh_ratio,
        "refresh_cpu_time_ratio": refresh_cpu_ratio,
        "step_time_sharded_over_replicated": step_ratio,
        "step_cpu_time_sharded_over_replicated": step_cpu_ratio,
        "goals": {
            "factor_memory_ratio >= 1.8": memory_ratio >= FACTOR_GOAL,
            "refresh_time_ratio >= 1.8": refresh_ratio >= FACTOR_GOAL,
            "refresh_cpu_time_ratio >= 1.8": refresh_cpu_ratio >= FACTOR_GOAL,
            "step_time_sharded_over_replicated <= 1": step_ratio <= STEP_GOAL,
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke run")
    print(json.dumps(run(parser.parse_args().quick), indent=2))
