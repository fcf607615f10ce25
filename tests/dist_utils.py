"""Real multi-process tests: spawn ranks with a gloo process group, collect what each rank returns.

The function a test runs on every rank must be importable (a module-level function of the test file,
which pytest puts on ``sys.path``); it gets ``(rank, world_size, *args)`` and returns something
``torch.save`` can write. A failing rank fails the test with its traceback.
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
    """A TCP port free right now, for one test's rendezvous (picked by the OS, not shared by tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, out: str, args: tuple[Any, ...]
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; their results by rank."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(fn, world_size, free_port(), out, args), nprocs=world_size, join=True)
        return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


# ------------------------------------------------------------------ a small model and its data


def mlp() -> torch.nn.Module:
    """The same small MLP every call (fixed seed): 2-D weights split into blocks at block_size 8."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12),
        torch.nn.Tanh(),
        torch.nn.Linear(12, 12),
        torch.nn.Tanh(),
        torch.nn.Linear(12, 3),
    )


def batches(count: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=g), torch.randn(size, 3, generator=g)) for _ in range(count)]


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def rank_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """The rows of a batch that ``rank`` trains on."""
    share = batch_size // world_size
    return slice(rank * share, (rank + 1) * share)


def split_batch_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, world_size: int) -> None:
    """In one process, the gradients DDP gives ``world_size`` ranks that split the batch, bit for bit.

    DDP averages the ranks' gradients (sum, then divide by the world size, or the reverse: dividing by a
    power of two is exact), and backward accumulates the shares in the same order as gloo's sum.
    """
    for rank in range(world_size):
        rows = rank_rows(len(x), rank, world_size)
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
    for param in model.parameters():
        if param.grad is not None:
            param.grad.div_(world_size)


def train_one_process(model: torch.nn.Module, opt: Any, steps: list) -> list:
    """Train in one process on the gradients DDP gives 2 ranks (``split_batch_backward``); the parameters
    after every step."""
    trajectory = []
    for x, y in steps:
        opt.zero_grad()
        split_batch_backward(model, x, y, world_size=2)
        opt.step()
        trajectory.append(flat_params(model))
    return trajectory


def train_ddp(rank: int, world_size: int, model: torch.nn.Module, opt: Any, steps: list) -> list:
    """Train under DistributedDataParallel, each rank on its rows of every batch; the parameters after every
    step."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    trajectory = []
    for x, y in steps:
        rows = rank_rows(len(x), rank, world_size)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x[rows]), y[rows]).backward()
        opt.step()
        trajectory.append(flat_params(model))
    return trajectory


def max_relative_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest relative distance between two trajectories, step by step."""
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b, strict=True))


def assert_checkpoint_is_union_of_shares(saved: dict[str, Any], shares: list[dict[int, Any]]) -> None:
    """A consolidated optimizer state holds exactly the union of the ranks' disjoint shares, each state
    tensor equal to the one its owner held."""
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    params = [key for group in saved["param_groups"] for key in group["params"]]
    assert sorted(saved["state"]) == sorted(params) == sorted(key for share in shares for key in share)
    for share in shares:
        for index, state in share.items():
            assert any(key.startswith("factor_") for key in state), index
            for key, value in state.items():
                stored = saved["state"][index][key]
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(stored)), (index, key)
