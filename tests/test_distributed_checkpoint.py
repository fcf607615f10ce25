"""Checkpoints of sharded Shampoo written on N ranks and resumed on M (2→1, 1→2), gathered or per rank.

The uninterrupted reference runs in this process with the gradients DDP computes on 2 ranks (bit for
bit, see ``split_batch_backward``), so any gap is the checkpoint's. Refreshes install one step late, so
the checkpoint (after step 5, a refresh step) carries a refresh in flight.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_utils import batches, max_relative_gap, mlp, run_ranks, train_ddp, train_one_process
from torch import nn

from lightning_shampoo import Shampoo
from lightning_shampoo.checkpoint import load_sharded_state_dict, sharded_state_dict
from lightning_shampoo.statedict import unpack

# DCP warns when it reads or writes without a process group, as the one-process runs here do.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

OPTIONS = dict(lr=1e-2, block_size=8, start_preconditioning_step=2, precondition_frequency=3, refresh_lag=1)
STEPS, SAVED_AT = 10, 5


def _resumed(model_state):
    model = mlp()
    model.load_state_dict(model_state)
    return model, Shampoo(model.parameters(), **OPTIONS)


def _scenarios(rank, world_size, data, single, single_dir, sharded_dir):
    out = {}
    # Written on 2 ranks: the rank's own part, the gathered whole (rank 0) and the per-rank DCP files.
    model = mlp()
    opt = Shampoo(model.parameters(), **OPTIONS)
    train_ddp(rank, world_size, model, opt, data[:SAVED_AT])
    out["partial"] = copy.deepcopy(opt.shard_state_dict())
    try:  # a share is never handed out as the state dict
        opt.state_dict()
    except RuntimeError as error:
        out["unconsolidated"] = str(error)
    opt.consolidate_state_dict(to=0)
    out["gathered"] = copy.deepcopy(opt.state_dict()) if rank == 0 else None
    out["model"] = copy.deepcopy(model.state_dict())
    dcp.save({"optimizer": sharded_state_dict(opt)}, checkpoint_id=sharded_dir)
    out["uninterrupted"] = train_ddp(rank, world_size, model, opt, data[SAVED_AT:])
    # Written by one process, resumed on 2 ranks: gathered, then per-rank files.
    model, opt = _resumed(single["model"])
    opt.load_state_dict(single["optimizer"])
    out["from_gathered"] = train_ddp(rank, world_size, model, opt, data[SAVED_AT:])
    model, opt = _resumed(single["model"])
    load_sharded_state_dict(opt, single_dir)
    out["from_sharded"] = train_ddp(rank, world_size, model, opt, data[SAVED_AT:])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = batches(STEPS)
    single_dir, sharded_dir = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    model = mlp()
    opt = Shampoo(model.parameters(), **OPTIONS)
    reference = train_one_process(model, opt, data[:SAVED_AT])
    assert opt.metrics()["in_flight"] == 1  # the checkpoint holds a refresh in flight
    single = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    dcp.save({"optimizer": sharded_state_dict(opt)}, checkpoint_id=single_dir)
    reference += train_one_process(model, opt, data[SAVED_AT:])
    ranks = run_ranks(_scenarios, data, single, str(single_dir), str(sharded_dir))
    return {"data": data, "reference": reference, "ranks": ranks, "sharded_dir": sharded_dir}


def test_two_ranks_follow_the_one_process_trajectory(runs):
    for rank in runs["ranks"]:
        assert max_relative_gap(rank["uninterrupted"], runs["reference"][SAVED_AT:]) <= 1e-6


@pytest.mark.parametrize("path", ["from_gathered", "from_sharded"])
def test_one_process_checkpoint_resumes_on_two_ranks(runs, path):
    for rank in runs["ranks"]:
        assert max_relative_gap(rank[path], runs["reference"][SAVED_AT:]) <= 1e-6


@pytest.mark.parametrize("path", ["gathered", "sharded"])
def test_two_rank_checkpoint_resumes_intrain_one_process(runs, path):
    model, opt = _resumed(runs["ranks"][0]["model"])
    if path == "gathered":
        opt.load_state_dict(runs["ranks"][0]["gathered"])
    else:
        load_sharded_state_dict(opt, runs["sharded_dir"])
    resumed = train_one_process(model, opt, runs["data"][SAVED_AT:])
    assert max_relative_gap(resumed, runs["reference"][SAVED_AT:]) <= 1e-6


def test_gathered_state_is_the_one_process_state(runs):
    """Keyed by parameter and block, not by rank: the gathered dict has the single-process layout."""
    gathered = runs["ranks"][0]["gathered"]
    model = mlp()
    opt = Shampoo(model.parameters(), **OPTIONS)
    train_one_process(model, opt, runs["data"][:SAVED_AT])
    single = opt.state_dict()
    assert gathered["state"].keys() == single["state"].keys()
    for index, state in single["state"].items():
        assert gathered["state"][index].keys() == state.keys()
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(gathered["state"][index][key], value, rtol=1e-6, atol=1e-9)
    pending, single_pending = (unpack(s)["shampoo"]["engine"]["pending"] for s in (gathered, single))
    assert [t["step"] for t in pending] == [t["step"] for t in single_pending]
    assert [s["param_index"] for s in pending[0]["snapshots"]] == [
        s["param_index"] for s in single_pending[0]["snapshots"]
    ]


def test_an_unconsolidated_state_dict_refuses_to_return_a_share(runs):
    for rank in runs["ranks"]:
        assert "consolidate_state_dict() on every rank" in rank["unconsolidated"]
        assert "prepare_shampoo" in rank["unconsolidated"]


def test_one_ranks_part_alone_is_refused_naming_a_missing_parameter(runs):
    partial = runs["ranks"][0]["partial"]
    missing = unpack(partial)["shampoo"]["shard"]["owners"].index(1)
    model = mlp()
    names = [name for name, _ in model.named_parameters()]
    opt = Shampoo(model.named_parameters(), **OPTIONS)
    with pytest.raises(ValueError, match=f"lacks the state of parameter '{names[missing]}'"):
        opt.load_state_dict(partial)
    assert not opt.state  # nothing was loaded


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(block_size=4), "saved with block_size=8"),
        (dict(max_preconditioned_dim=6), "saved with max_preconditioned_dim=None"),
    ],
)
def test_sharded_checkpoint_of_other_structure_is_refused_before_reading(runs, change, message):
    model = mlp()
    opt = Shampoo(model.named_parameters(), **{**OPTIONS, **change})
    with pytest.raises(ValueError, match=message):
        load_sharded_state_dict(opt, runs["sharded_dir"])
    assert not opt.state


def test_sharded_checkpoint_of_another_model_is_refused_naming_the_parameter(runs):
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))
    opt = Shampoo(other.named_parameters(), **OPTIONS)
    with pytest.raises(ValueError, match=r"does not match parameter '2.weight' \(shape \(10, 12\)\)"):
        load_sharded_state_dict(opt, runs["sharded_dir"])
