"""Real multi-process runs on CPU: spawn ranks with a gloo process group, collect what each rank returns.

One harness for the tests (``tests/dist_utils.py``) and the benchmarks (:mod:`benchmarks.scaling`). The
function run on every rank must be importable by the spawned processes (a module-level function); it gets
``(rank, world_size, *args)`` and returns something ``torch.save`` can write. Each rank runs with one
intra-op thread. A failing rank fails the run with its traceback.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free right now, for one run's rendezvous (picked by the OS)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    timeout_s: float,
    out: str,
    args: tuple[Any, ...],
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    try:
        torch.save(fn(rank, world_size, *args), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout_s: float = 60.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; their results by rank.

    ``timeout_s``: how long a collective may wait for the other ranks before the run fails.
    """
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(
            _worker,
            args=(fn, world_size, free_port(), timeout_s, out, args),
            nprocs=world_size,
            join=True,
        )
        return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
