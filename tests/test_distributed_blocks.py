"""Ownership by block over real gloo ranks: a matrix too large to balance whole is split across ranks by
blocks, for both preconditioners. Training equals one process, the parameters stay bitwise identical on
every rank with one collective per step, the consolidated state dict is the one-process one, and
checkpoints move 2→1, 1→2 and 4→2.

One 4-rank spawn and one 2-rank spawn run every scenario (module fixtures); the one-process references run
in the pytest process. At 2 ranks DDP's gradients are those of ``split_batch_backward`` bit for bit; gloo
sums 4 ranks' shares in another order, so the 4-rank reference replays the gradients rank 0 saw.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from dist_utils import flat_params, max_relative_gap, run_ranks, train_ddp, train_one_process
from torch import nn

from lightning_shampoo import Shampoo
from lightning_shampoo.blocking import plan_blocks
from lightning_shampoo.checkpoint import sharded_state_dict
from lightning_shampoo.cost import parameter_work
from lightning_shampoo.partition import SPLIT_MIN_FLOPS
from lightning_shampoo.statedict import unpack

PRECONDITIONERS = ("root_inverse", "eigenvalue_corrected", "compact")
# Roots install one step late (a parameter's first at once), so the checkpoint after step 8 holds a refresh
# in flight.
OPTIONS = {
    "root_inverse": dict(lr=1e-2, block_size=32, start_preconditioning_step=2, precondition_frequency=3),
    "eigenvalue_corrected": dict(
        lr=1e-2, block_size=32, start_preconditioning_step=5, precondition_frequency=3,
        preconditioner="eigenvalue_corrected", graft="none",
    ),
    # Packed float32 factors and bfloat16 roots, split by blocks across ranks.
    "compact": dict(
        lr=1e-2, block_size=32, start_preconditioning_step=2, precondition_frequency=3,
        factor_dtype=torch.bfloat16,
    ),
}  # fmt: skip
COMMON = dict(refresh_lag=1)
STEPS, SAVED_AT = 12, 8
DOMINANT = 2  # the 192×128 weight: 24 blocks of 32×32, over half of the optimizer's work


def _options(kind: str) -> dict[str, Any]:
    return {**OPTIONS[kind], **COMMON}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 128), nn.Tanh(), nn.Linear(128, 192), nn.Tanh(), nn.Linear(192, 3))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(STEPS)]


def _resumed(model_state: dict[str, Any], kind: str) -> tuple[nn.Module, Shampoo]:
    model = _model()
    model.load_state_dict(model_state)
    return model, Shampoo(model.parameters(), **_options(kind))


def _dominant_blocks(opt: Shampoo) -> dict[str, int]:
    """Blocks of every factor stack of the dominant matrix that this rank keeps (by local name)."""
    state = opt.state[list(opt.param_groups[0]["params"])[DOMINANT]]
    return {key: value.shape[0] for key, value in state.items() if key.startswith("factor_")}


def _from_scratch(rank: int, world_size: int, kind: str, data: list) -> dict[str, Any]:
    """Train from scratch; the state consolidated after ``SAVED_AT`` steps, with the model, on rank 0."""
    model = _model()
    opt = Shampoo(model.parameters(), **_options(kind))
    log: list[dict[str, Any]] = []
    trajectory = train_ddp(rank, world_size, model, opt, data[:SAVED_AT], log)
    share = copy.deepcopy(opt.shard_state_dict())
    opt.consolidate_state_dict(to=0)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    trajectory += train_ddp(rank, world_size, model, opt, data[SAVED_AT:], log)
    try:
        sharded_state_dict(opt)
        refused = ""
    except ValueError as error:
        refused = str(error)
    return {
        "trajectory": trajectory,
        "grads": [entry["grads"] for entry in log] if rank == 0 else None,
        "collectives": [entry["collectives"] for entry in log],
        "saved": saved if rank == 0 else None,
        "share": share,
        "refused": refused,
        "shard": opt.layout.shard_info(),
        "blocks": _dominant_blocks(opt),
    }


def _four(rank: int, world_size: int, data: list) -> dict[str, Any]:
    return {kind: _from_scratch(rank, world_size, kind, data) for kind in PRECONDITIONERS}


def _two(rank: int, world_size: int, data: list, singles: dict, fours: dict) -> dict[str, Any]:
    """From scratch, and resumed from a one-process and a 4-rank checkpoint."""
    out: dict[str, Any] = {}
    for kind in PRECONDITIONERS:
        out[kind] = _from_scratch(rank, world_size, kind, data)
        out[kind]["resumed"] = {}
        for origin, checkpoint in (("one", singles[kind]), ("four", fours[kind])):
            model, opt = _resumed(checkpoint["model"], kind)
            opt.load_state_dict(checkpoint["optimizer"])
            out[kind]["resumed"][origin] = train_ddp(rank, world_size, model, opt, data[SAVED_AT:])
    return out


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    data = _data()
    references, singles = {}, {}
    for kind in PRECONDITIONERS:
        model = _model()
        opt = Shampoo(model.parameters(), **_options(kind))
        reference = train_one_process(model, opt, data[:SAVED_AT])
        assert opt.metrics()["in_flight"] == 1
        singles[kind] = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
        references[kind] = reference + train_one_process(model, opt, data[SAVED_AT:])
    four = run_ranks(_four, data, world_size=4)
    fours = {kind: four[0][kind]["saved"] for kind in PRECONDITIONERS}
    two = run_ranks(_two, data, singles, fours)
    return {"data": data, "references": references, "singles": singles, "four": four, "two": two}


@pytest.fixture(params=PRECONDITIONERS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def test_the_dominant_matrix_exceeds_its_fair_share_and_the_split_threshold() -> None:
    work = [parameter_work(plan_blocks(tuple(p.shape), 32), 3) for p in _model().parameters()]
    total = sum(w.total for w in work)
    assert work[DOMINANT].total > total / 2 and work[DOMINANT].total >= SPLIT_MIN_FLOPS
    assert all(w.total < total / 4 for i, w in enumerate(work) if i != DOMINANT)


@pytest.mark.parametrize("world", ["two", "four"])
def test_the_dominant_matrix_is_split_across_ranks_by_blocks(runs: dict, kind: str, world: str) -> None:
    ranks = runs[world]
    single = runs["singles"][kind]["optimizer"]["state"][DOMINANT]
    whole = {key: value.shape[0] for key, value in single.items() if key.startswith("factor_")}
    for rank, result in enumerate(ranks):
        shard = result[kind]["shard"]
        assert shard["split"] == [DOMINANT] and shard["owners"][DOMINANT] == -1 and shard["rank"] == rank
        assert all(owner >= 0 for i, owner in enumerate(shard["owners"]) if i != DOMINANT)
    blocks = [result[kind]["blocks"] for result in ranks]
    # Every rank keeps a part (fewer blocks than the whole), and the parts add up to the whole.
    assert all(0 < sum(part.values()) < sum(whole.values()) for part in blocks)
    assert sum(sum(part.values()) for part in blocks) == sum(whole.values())


def test_two_ranks_follow_the_one_process_trajectory(runs: dict, kind: str) -> None:
    first, second = (rank[kind]["trajectory"] for rank in runs["two"])
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # replicated bit for bit
    assert max_relative_gap(first, runs["references"][kind]) <= 1e-6
    assert float((first[-1] - first[0]).norm()) > 0.1  # it trained


def test_four_ranks_follow_the_one_process_trajectory(runs: dict, kind: str) -> None:
    four = runs["four"]
    for other in four[1:]:
        assert all(torch.equal(a, b) for a, b in zip(four[0][kind]["trajectory"], other[kind]["trajectory"]))
    model = _model()
    opt = Shampoo(model.parameters(), **_options(kind))
    replayed = []
    for grads in four[0][kind]["grads"]:
        for param, grad in zip(model.parameters(), grads, strict=True):
            param.grad = grad.clone()
        opt.step()
        replayed.append(flat_params(model))
    assert max_relative_gap(four[0][kind]["trajectory"], replayed) <= 1e-6


@pytest.mark.parametrize("world", ["two", "four"])
def test_one_collective_per_step(runs: dict, kind: str, world: str) -> None:
    for rank in runs[world]:
        first, *rest = rank[kind]["collectives"]
        # The first step also checks once that the parameters are replicated (DDP's own all-reduce of the
        # gradients runs in backward, outside the count).
        assert sorted(first) == ["all_gather_object", "all_gather_single"]
        assert all(calls == ["all_gather_single"] for calls in rest)


@pytest.mark.parametrize("world", ["two", "four"])
def test_the_consolidated_state_is_the_one_process_state(runs: dict, kind: str, world: str) -> None:
    saved = unpack(runs[world][0][kind]["saved"]["optimizer"])  # sectioned: refreshes as tickets
    model = _model()
    opt = Shampoo(model.parameters(), **_options(kind))
    if world == "two":
        train_one_process(model, opt, runs["data"][:SAVED_AT])
    else:  # the gradients of the four ranks, replayed
        for grads in runs["four"][0][kind]["grads"][:SAVED_AT]:
            for param, grad in zip(model.parameters(), grads, strict=True):
                param.grad = grad.clone()
            opt.step()
    single = unpack(opt.state_dict())
    assert saved["state"].keys() == single["state"].keys() and "shard" not in saved["shampoo"]
    for index, state in single["state"].items():
        assert saved["state"][index].keys() == state.keys(), index
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert saved["state"][index][key].dtype == value.dtype, (index, key)
                torch.testing.assert_close(saved["state"][index][key], value, rtol=1e-6, atol=1e-9)
            else:
                assert saved["state"][index][key] == value, (index, key)
    pending, expected = saved["shampoo"]["engine"]["pending"], single["shampoo"]["engine"]["pending"]
    assert [(t["step"], t["install_step"], "results" in t) for t in pending] == [
        (t["step"], t["install_step"], "results" in t) for t in expected
    ]
    for ticket, reference in zip(pending, expected, strict=True):
        names = [(s["param_index"], s["name"]) for s in ticket["snapshots"]]
        assert names == [(s["param_index"], s["name"]) for s in reference["snapshots"]]
        for snapshot, other in zip(ticket["snapshots"], reference["snapshots"], strict=True):
            assert snapshot.keys() == other.keys()
            if "matrices" in other:  # a computed refresh is saved by its results
                torch.testing.assert_close(snapshot["matrices"], other["matrices"], rtol=1e-6, atol=1e-9)
        for result, other in zip(ticket.get("results", []), reference.get("results", []), strict=True):
            assert result.keys() == other.keys()
            torch.testing.assert_close(result["accepted"], other["accepted"])


def test_a_one_process_checkpoint_resumes_on_two_ranks(runs: dict, kind: str) -> None:
    for rank in runs["two"]:
        assert max_relative_gap(rank[kind]["resumed"]["one"], runs["references"][kind][SAVED_AT:]) <= 1e-6


def test_a_two_rank_checkpoint_resumes_in_one_process(runs: dict, kind: str) -> None:
    saved = runs["two"][0][kind]["saved"]
    model, opt = _resumed(saved["model"], kind)
    opt.load_state_dict(saved["optimizer"])
    resumed = train_one_process(model, opt, runs["data"][SAVED_AT:])
    assert max_relative_gap(resumed, runs["references"][kind][SAVED_AT:]) <= 1e-6


def test_a_four_rank_checkpoint_resumes_on_two_ranks(runs: dict, kind: str) -> None:
    saved = runs["four"][0][kind]["saved"]
    model, opt = _resumed(saved["model"], kind)
    opt.load_state_dict(saved["optimizer"])
    reference = train_one_process(model, opt, runs["data"][SAVED_AT:])
    for rank in runs["two"]:
        assert max_relative_gap(rank[kind]["resumed"]["four"], reference) <= 1e-6


def test_one_ranks_share_of_a_split_matrix_is_refused(runs: dict, kind: str) -> None:
    # Complete but for the split matrix, whose state in the share covers rank 0's blocks only.
    share, complete = runs["two"][0][kind]["share"], runs["two"][0][kind]["saved"]["optimizer"]
    share = {**share, "state": {**complete["state"], DOMINANT: share["state"][DOMINANT]}}
    model = _model()
    names = [name for name, _ in model.named_parameters()]
    opt = Shampoo(model.named_parameters(), **_options(kind))
    with pytest.raises(ValueError, match=f"only rank 0's share of parameter '{names[DOMINANT]}'"):
        opt.load_state_dict(share)
    assert not opt.state


def test_per_rank_files_refuse_a_split_matrix(runs: dict, kind: str) -> None:
    for rank in runs["two"]:
        assert "consolidate_state_dict() on every rank" in rank[kind]["refused"]
