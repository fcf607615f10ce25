"""Shampoo through Accelerate's FSDP2 machinery, on 2 gloo ranks on CPU.

Accelerate itself never selects FSDP on CPU: ``AcceleratorState`` switches to ``DistributedType.FSDP``
only for the multi-GPU (and other accelerator) types, so on CPU ``Accelerator(fsdp_plugin=...)`` runs DDP
(``MULTI_CPU``). What its FSDP2 support does with an optimizer is run here directly, on a real
``Accelerator`` (``MULTI_CPU``) and a real ``fully_shard`` model: ``prepare_optimizer`` (a state-dict round
trip on the plain parameters), the swap of the optimizer's parameters for the sharded DTensors
(``_prepare_fsdp2``'s placeholders, then Accelerate's ``fsdp2_switch_optimizer_parameters``), and
``save_state`` / ``load_state``'s optimizer functions ``save_fsdp_optimizer`` / ``load_fsdp_optimizer``
with both state dict types (sharded: ``dcp.save`` / ``dcp.load`` into a fresh optimizer's state dict;
full: rank 0's ``torch.save``, broadcast into a fresh optimizer's state dict).
"""

from __future__ import annotations

import gc
import os
import weakref
from typing import Any

import pytest
import torch
from dist_utils import RefreshGate, run_ranks, train_shards
from torch import nn

from lightning_shampoo import Shampoo

# Refreshes at 2, 5, 8, … installed 2 steps later: the save after step 9 has step 8's in flight.
OPTIONS = dict(lr=1e-2, block_size=4, start_preconditioning_step=2, precondition_frequency=3)
OPTIONS |= dict(refresh="async", refresh_lag=2)
STEPS, SAVED_AT = 16, 9
STATE_DICT_TYPES = ["SHARDED_STATE_DICT", "FULL_STATE_DICT"]


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _prepared(accelerator: Any, seed: int, decide_layout: bool = False) -> tuple[nn.Module, Any, list]:
    """Model and optimizer the way Accelerate's FSDP2 preparation leaves them: the optimizer is built on the
    plain parameters and prepared, then its parameters are swapped for the sharded ones."""
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    model = _model(seed)
    optimizer = accelerator.prepare_optimizer(Shampoo(model.parameters(), **OPTIONS))
    if decide_layout:
        _ = optimizer.optimizer.layout  # chosen for the plain parameters: must be chosen again
    plain = [weakref.ref(p) for p in model.parameters()]
    names = {p: name for name, p in model.named_parameters()}
    pointers = {name: p.data_ptr() for p, name in names.items()}
    for group in optimizer.param_groups:  # _prepare_fsdp2: placeholders remembering the data pointers
        for i, param in enumerate(group["params"]):
            group["params"][i] = torch.empty(1, dtype=param.dtype)
            group["params"][i].data_ptr = param.data_ptr()
    del names, param
    model = _shard(model)
    mapping = {pointers[name]: param for name, param in model.named_parameters()}
    fsdp2_switch_optimizer_parameters(optimizer, mapping)
    return model, optimizer, plain


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)) for _ in range(STEPS)]


def _scenarios(rank: int, world_size: int, directory: str) -> dict[str, Any]:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    os.environ["ACCELERATE_USE_CPU"] = "true"
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import load_fsdp_optimizer, save_fsdp_optimizer

    from lightning_shampoo.accelerate import prepare_shampoo

    accelerator = Accelerator()
    batches = _batches()
    out: dict[str, Any] = {"distributed_type": str(accelerator.distributed_type)}

    # Reference: Shampoo built on the sharded parameters directly, never swapped.
    model = _shard(_model(0))
    with Shampoo(model.parameters(), **OPTIONS) as direct:
        out["direct"] = train_shards(model, direct, batches, rank, world_size)

    model, optimizer, plain = _prepared(accelerator, 0, decide_layout=True)
    out["layout"] = optimizer.optimizer.layout.name
    gc.collect()
    out["plain_released"] = all(ref() is None for ref in plain)
    out["swapped"] = train_shards(model, optimizer, batches, rank, world_size)
    optimizer.optimizer.close()

    for state_dict_type in STATE_DICT_TYPES:
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=state_dict_type)
        model, optimizer, _ = _prepared(accelerator, 0)
        prepare_shampoo(accelerator, optimizer)
        train_shards(model, optimizer, batches[: SAVED_AT - 2], rank, world_size)
        optimizer.optimizer.drain()
        # Rank 1 saves step 8's refresh still being computed, rank 0 with its results.
        gate = RefreshGate()
        if rank == 1:
            gate.open.clear()
        train_shards(model, optimizer, batches[SAVED_AT - 2 : SAVED_AT], rank, world_size)
        if rank == 0:
            optimizer.optimizer.drain()
        shards = [p.to_local().detach().clone() for p in model.parameters()]
        in_flight = optimizer.optimizer.metrics()["in_flight"]
        save_fsdp_optimizer(plugin, accelerator, optimizer, model, f"{directory}/{state_dict_type}")
        gate.restore()
        optimizer.optimizer.close()

        model, optimizer, _ = _prepared(accelerator, 5)  # initialised differently
        with torch.no_grad():
            for param, shard in zip(model.parameters(), shards, strict=True):
                param.to_local().copy_(shard)
        load_fsdp_optimizer(plugin, accelerator, optimizer, model, f"{directory}/{state_dict_type}")
        resumed = train_shards(model, optimizer, batches[SAVED_AT:], rank, world_size)
        out[state_dict_type] = {
            "in_flight": in_flight,
            "resumed": resumed,
            "step": optimizer.optimizer.metrics()["step"],
        }
        optimizer.optimizer.close()

    # State loaded before the swap belongs to the plain parameters: refused with what to do.
    model = _model(0)
    optimizer = accelerator.prepare_optimizer(Shampoo(model.parameters(), **OPTIONS))
    nn.functional.mse_loss(model(batches[0][0]), batches[0][1]).backward()
    optimizer.step()
    model = _shard(model)
    for group in optimizer.param_groups:
        group["params"] = list(model.parameters())
    try:
        optimizer.step()
    except RuntimeError as error:
        out["stale_state_error"] = str(error)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(_scenarios, str(tmp_path_factory.mktemp("accelerate_fsdp")))


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for step_a, step_b in zip(a, b, strict=True) for x, y in zip(step_a, step_b))


def test_accelerate_runs_ddp_on_cpu_whatever_the_fsdp_plugin(runs: list[dict[str, Any]]) -> None:
    assert {result["distributed_type"] for result in runs} == {"DistributedType.MULTI_CPU"}


def test_parameters_swapped_after_the_optimizer_exists_train_like_the_sharded_ones(
    runs: list[dict[str, Any]],
) -> None:
    for result in runs:
        assert result["plain_released"]  # no cache keeps a whole unsharded parameter alive
        assert result["layout"] == "shard_local"  # chosen again for the DTensor parameters
        assert _same(result["swapped"], result["direct"])
    assert not torch.equal(runs[0]["direct"][-1][0], runs[1]["direct"][-1][0])  # different shards


@pytest.mark.parametrize("state_dict_type", STATE_DICT_TYPES)
def test_accelerate_fsdp2_save_and_load_resume_bitwise(
    runs: list[dict[str, Any]], state_dict_type: str
) -> None:
    for result in runs:
        saved = result[state_dict_type]
        assert saved["in_flight"] == 1  # step 8's refresh travels in the checkpoint
        assert saved["step"] == STEPS  # the optimizer-wide clock too
        assert _same(saved["resumed"], result["direct"][SAVED_AT:])


def test_state_of_replaced_parameters_is_refused(runs: list[dict[str, Any]]) -> None:
    for result in runs:
        assert "replaced (e.g. by accelerator.prepare with FSDP2)" in result["stale_state_error"]
