"""Real multi-process tests: ranks spawned with a gloo process group by :mod:`benchmarks.spawn` (the
harness the scaling benchmark uses too), a small model and its data, and the one-process references.

The function a test runs on every rank must be importable (a module-level function of the test file,
which pytest puts on ``sys.path``); it gets ``(rank, world_size, *args)`` and returns something
``torch.save`` can write. A failing rank fails the test with its traceback.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.spawn import free_port, run_ranks
from lightning_shampoo import refresh
from lightning_shampoo.statedict import SECTION

__all__ = ["free_port", "run_ranks"]

COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "broadcast_object_list",
    "gather_object",
    "reduce_scatter_tensor",
)


@contextmanager
def counting_collectives(calls: list[str]) -> Iterator[None]:
    """Record the outermost torch.distributed collective calls made inside the block (they still run)."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    depth = [0]

    def wrap(name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if not depth[0]:
                calls.append(name)
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


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


def train_one_process(model: torch.nn.Module, opt: Any, steps: list, world_size: int = 2) -> list:
    """Train in one process on the gradients DDP gives ``world_size`` ranks (``split_batch_backward``); the
    parameters after every step."""
    trajectory = []
    for x, y in steps:
        opt.zero_grad()
        split_batch_backward(model, x, y, world_size)
        opt.step()
        trajectory.append(flat_params(model))
    return trajectory


def train_ddp(
    rank: int, world_size: int, model: torch.nn.Module, opt: Any, steps: list, log: list | None = None
) -> list:
    """Train under DistributedDataParallel, each rank on its rows of every batch; the parameters after every
    step. ``log`` gets, per step, the gradients and the collectives ``opt.step()`` called."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    trajectory = []
    for x, y in steps:
        rows = rank_rows(len(x), rank, world_size)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x[rows]), y[rows]).backward()
        calls: list[str] = []
        with counting_collectives(calls):
            opt.step()
        if log is not None:
            log.append({"grads": [p.grad.clone() for p in model.parameters()], "collectives": calls})
        trajectory.append(flat_params(model))
    return trajectory


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard; a plain tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def train_shards(model: torch.nn.Module, opt: Any, steps: list, rank: int = 0, world_size: int = 1) -> list:
    """Train a (``fully_shard``-ed or plain) model, each rank on its rows of every batch; the parameters'
    local shards after every step."""
    trajectory = []
    for x, y in steps:
        rows = rank_rows(len(x), rank, world_size)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()
        trajectory.append([local(p).detach().clone() for p in model.parameters()])
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
        # Every share holds Kronecker factors (of its matrices; vectors keep the diagonal method alone).
        assert any(key.startswith("factor_") for state in share.values() for key in state)
        for index, state in share.items():
            for key, value in state.items():
                if key == SECTION:  # live it is an empty placeholder; saved it holds clock and refreshes
                    continue
                stored = saved["state"][index][key]
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(stored)), (index, key)


class RefreshGate:
    """Holds every refresh computation of this process while ``open`` is clear (the real computation
    follows): a checkpoint then has a refresh in flight whose results are not computed yet."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self._real = refresh.compute_refresh
        refresh.compute_refresh = self._compute

    def _compute(self, snapshots: Any, settings: Any, *workers: int) -> Any:
        self.open.wait()
        return self._real(snapshots, settings, *workers)

    def restore(self) -> None:
        self.open.set()
        refresh.compute_refresh = self._real
