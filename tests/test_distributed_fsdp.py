"""Shampoo on FSDP2 (``fully_shard``, DTensor parameters) with 2 gloo ranks on CPU.

Each rank preconditions its dim-0 shard as blocks of its own. When ``block_size`` divides every shard's
rows those are the blocks of the whole parameter, so the run equals one process with the whole batch;
uneven shards are planned at the common shard length with zero rows. Factor state is DTensor state, so
``torch.distributed.checkpoint`` gives every rank its own factors back.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import rank_rows, run_ranks
from torch import nn

from lightning_shampoo import Shampoo

# Rows 16 and 8 split into shards of 8 and 4: block_size 4 divides them. Biases are grafted only, and the
# first roots come after 4 steps, for the conditioning reason given in test_distributed.py. Roots install
# one step late, so the checkpoint after step 7 (a refresh step) holds a refresh in flight.
EVEN = dict(
    lr=1e-2,
    block_size=4,
    start_preconditioning_step=4,
    precondition_frequency=3,
    precondition_1d=False,
    refresh_lag=1,
)
# Rows 5 and 3 split 3+2 and 2+1; the (1, 5) shard would squeeze to a vector if planned alone.
UNEVEN = dict(lr=1e-2, block_size=4, start_preconditioning_step=2, precondition_frequency=3, refresh_lag=1)
STEPS, SAVED_AT = 10, 7


def _even_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 8))


def _uneven_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))


def _data(outputs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=g), torch.randn(16, outputs, generator=g)) for _ in range(STEPS)]


def _sharded(build):
    from torch.distributed.fsdp import fully_shard

    model = build()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _shards(model) -> list[torch.Tensor]:
    return [p.to_local().detach().clone() for p in model.parameters()]


def _train(rank, world_size, model, opt, data, grads=None):
    trajectory = []
    for x, y in data:
        rows = rank_rows(len(x), rank, world_size)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        if grads is not None:
            grads.append([p.grad.to_local().clone() for p in model.parameters()])
        opt.step()
        trajectory.append(_shards(model))
    return trajectory


def _blocks(opt, model) -> list[dict[str, torch.Tensor]]:
    """Every parameter's per-block state as saved (DTensors: DCP keeps each rank's), as local stacks."""
    state = opt.state_dict()["state"]
    return [
        {k: v.to_local().clone() for k, v in state[i].items() if k.startswith(("factor_", "root_"))}
        for i, _ in enumerate(model.parameters())
    ]


def _restored(build, options, shards):
    model = _sharded(build)
    with torch.no_grad():
        for param, shard in zip(model.parameters(), shards, strict=True):
            param.to_local().copy_(shard)
    return model, Shampoo(model.parameters(), **options)


def _scenarios(rank, world_size, even_data, uneven_data, directory):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from lightning_shampoo.checkpoint import load_sharded_state_dict, sharded_state_dict

    out = {}
    model = _sharded(_even_model)
    opt = Shampoo(model.parameters(), **EVEN)
    out["even"] = _train(rank, world_size, model, opt, even_data[:SAVED_AT])
    saved = opt.state_dict()["state"].values()
    out["factor_types"] = {
        type(v).__name__ for s in saved for k, v in s.items() if k.startswith(("factor_", "root_"))
    }
    out["saved_blocks"] = _blocks(opt, model)
    out["in_flight"] = opt.metrics()["in_flight"]
    saved_shards = _shards(model)
    dcp.save({"optimizer": sharded_state_dict(opt)}, checkpoint_id=f"{directory}/ours")
    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=f"{directory}/torch")
    out["even"] += _train(rank, world_size, model, opt, even_data[SAVED_AT:])

    model, opt = _restored(_even_model, EVEN, saved_shards)
    load_sharded_state_dict(opt, f"{directory}/ours")
    out["ours_blocks"] = _blocks(opt, model)
    out["resumed"] = _train(rank, world_size, model, opt, even_data[SAVED_AT:])

    model, opt = _restored(_even_model, EVEN, saved_shards)
    state = {"optimizer": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=f"{directory}/torch")
    set_optimizer_state_dict(model, opt, state["optimizer"])
    out["torch_blocks"] = _blocks(opt, model)

    model = _sharded(_uneven_model)
    opt = Shampoo(model.parameters(), **UNEVEN)
    out["uneven_grads"] = []
    out["uneven"] = _train(rank, world_size, model, opt, uneven_data, grads=out["uneven_grads"])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    even_data, uneven_data = _data(8), _data(3)
    ranks = run_ranks(_scenarios, even_data, uneven_data, str(tmp_path_factory.mktemp("fsdp")))
    return {"even_data": even_data, "ranks": ranks}


def _gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float((a - b).norm() / b.norm())


def test_fsdp_matches_one_process_with_the_same_blocking(runs):
    model = _even_model()
    opt = Shampoo(model.parameters(), **EVEN)
    for step, (x, y) in enumerate(runs["even_data"]):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        for rank, result in enumerate(runs["ranks"]):
            expected = [p.detach().chunk(2)[rank] for p in model.parameters()]
            assert _gap(result["even"][step], expected) < 1e-5, (step, rank)
    assert opt.state[model[0].weight]["preconditioned"]


def test_factor_state_is_dtensor_and_differs_between_ranks(runs):
    assert runs["ranks"][0]["factor_types"] == {"DTensor"}
    first, second = (result["saved_blocks"][0]["factor_0_0"] for result in runs["ranks"])
    assert first.shape == second.shape == (4, 4, 4)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("path", ["ours_blocks", "torch_blocks"])
def test_checkpoint_gives_every_rank_its_own_factors_back(runs, path):
    for result in runs["ranks"]:
        for saved, loaded in zip(result["saved_blocks"], result[path], strict=True):
            assert saved.keys() == loaded.keys()
            for key in saved:
                assert torch.equal(saved[key], loaded[key]), key


def test_resumed_fsdp_run_continues_the_uninterrupted_one(runs):
    for result in runs["ranks"]:
        assert result["in_flight"] == 1
        for resumed, uninterrupted in zip(result["resumed"], result["even"][SAVED_AT:], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted, strict=True))


def test_uneven_shards_are_preconditioned_at_the_common_shard_length(runs):
    """Reference: plain Shampoo on parameters of the padded shard shape, fed the rank's gradients with
    zero rows appended; its real rows must be the rank's shard."""
    full = [p.detach() for p in _uneven_model().parameters()]
    for rank, result in enumerate(runs["ranks"]):
        padded = []
        for tensor in full:
            shard = tensor.chunk(2)[rank]
            rows = -(-tensor.shape[0] // 2)
            padded.append(torch.cat([shard, shard.new_zeros(rows - shard.shape[0], *shard.shape[1:])]))
        params = [nn.Parameter(p.clone()) for p in padded]
        opt = Shampoo(params, **UNEVEN)
        for step, grads in enumerate(result["uneven_grads"]):
            for param, grad in zip(params, grads, strict=True):
                param.grad = torch.cat(
                    [grad, grad.new_zeros(param.shape[0] - grad.shape[0], *grad.shape[1:])]
                )
            opt.step()
            real = [p.detach()[: s.shape[0]] for p, s in zip(params, result["uneven"][step], strict=True)]
            assert _gap(result["uneven"][step], real) < 1e-5, (step, rank)
        assert all(opt.state[p]["preconditioned"] for p in params)
    # Rank 1 holds a (1, 5) shard of the second weight: alone it would squeeze to a vector.
    assert runs["ranks"][1]["uneven"][0][2].shape == (1, 5)
