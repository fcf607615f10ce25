"""``torch.distributed.checkpoint``'s standard API round-trips Shampoo exactly.

``get_state_dict`` / ``set_state_dict`` and ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``,
nested and with ``flatten_optimizer_state_dict``, in memory and through ``dcp.save`` / ``dcp.load`` into a
fresh optimizer's state dict (what trainers and Accelerate's FSDP2 support do): a fresh model and
optimizer continue the uninterrupted run bitwise, including the optimizer-wide clock (the refresh
schedule's step, a pending ``request_refresh()``, the counters) and an async refresh in flight at the save,
computed or not. In one process, and under FSDP2 (``fully_shard``) on 2 gloo ranks.
"""

from __future__ import annotations

import copy
import functools
import io
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_utils import RefreshGate, local, run_ranks, train_shards
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from lightning_shampoo import Shampoo
from lightning_shampoo.statedict import unpack

# Both preconditioners, and the root inverse with compact storage (packed float32 factors, bfloat16 roots).
KINDS = {
    "root_inverse": {},
    "eigenvalue_corrected": {"preconditioner": "eigenvalue_corrected"},
    "compact": {"factor_dtype": torch.bfloat16},
}
PRECONDITIONERS = list(KINDS)
# Refreshes at steps 2, 5, 8, 11, …, each installed 2 steps later: the save after step 9 has step 8's
# refresh in flight, and a refresh requested after step 9 happens at step 10.
OPTIONS = dict(lr=1e-2, block_size=8, start_preconditioning_step=2, precondition_frequency=3)
OPTIONS |= dict(refresh="async", refresh_lag=2)
STEPS, SAVED_AT = 18, 9
PROGRESS = ("step", "refreshes", "roots_accepted", "roots_rejected", "nonfinite_skips", "max_root_residual")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def _first_run(build: Any, kind: str, batches: list, computed: bool, rank: int = 0, world: int = 1) -> tuple:
    """Train to the save with step 8's refresh in flight (``computed``: its results ready, else still
    being computed) and a refresh requested; the model, optimizer and the gate to open after saving."""
    model = build()
    opt = Shampoo(model.parameters(), **KINDS[kind], **OPTIONS)
    gate = RefreshGate()
    train_shards(model, opt, batches[: SAVED_AT - 2], rank, world)
    opt.drain()  # step 5's refresh, installed at step 7, is done: the gate can close
    if not computed:
        gate.open.clear()
    train_shards(model, opt, batches[SAVED_AT - 2 : SAVED_AT], rank, world)
    if computed:
        opt.drain()
    opt.request_refresh()
    assert opt.metrics()["in_flight"] == 1
    return model, opt, gate


def _reference(build: Any, kind: str, batches: list, rank: int = 0, world: int = 1) -> tuple[list, dict]:
    model = build()
    with Shampoo(model.parameters(), **KINDS[kind], **OPTIONS) as opt:
        trajectory = train_shards(model, opt, batches[:SAVED_AT], rank, world)
        opt.request_refresh()
        trajectory += train_shards(model, opt, batches[SAVED_AT:], rank, world)
        return trajectory[SAVED_AT:], {key: opt.metrics()[key] for key in PROGRESS}


def _save(model: nn.Module, opt: Shampoo, api: str, options: StateDictOptions) -> dict[str, Any]:
    if api == "state_dict":
        model_state, optimizer_state = get_state_dict(model, opt, options=options)
        return {"model": model_state, "optimizer": optimizer_state}
    return {"optimizer": get_optimizer_state_dict(model, opt, options=options)}


def _load(model: nn.Module, opt: Shampoo, api: str, options: StateDictOptions, saved: dict[str, Any]) -> None:
    if api == "state_dict":
        set_state_dict(
            model, opt, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"], options=options
        )
    else:
        set_optimizer_state_dict(model, opt, saved["optimizer"], options=options)


def _resume(
    build: Any, kind: str, batches: list, api: str, flatten: bool, transport: str, computed: bool, where: str,
    rank: int = 0, world: int = 1,
) -> tuple[list, dict, dict]:  # fmt: skip
    """Save after ``SAVED_AT`` steps through the API, load into a fresh model and optimizer, train on.

    Returns the resumed trajectory, the resumed optimizer's clock and counters, and what the saved
    optimizer state says about the refresh in flight."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model, opt, gate = _first_run(build, kind, batches, computed, rank, world)
    try:
        weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
        saved = _save(model, opt, api, options)
        evidence = _in_flight_entry(saved["optimizer"], flatten)
        if transport == "dcp":
            dcp.save(saved, checkpoint_id=where)
    finally:
        gate.restore()
    opt.close()

    second = build(seed=5)  # initialised differently: everything must come from the checkpoint
    fresh = Shampoo(second.parameters(), **KINDS[kind], **OPTIONS)
    if transport == "dcp":
        saved = _save(second, fresh, api, options)  # the template dcp.load fills in place
        dcp.load(saved, checkpoint_id=where)
    if api == "optimizer":
        second.load_state_dict(weights)
    _load(second, fresh, api, options, saved)
    with fresh:
        trajectory = train_shards(second, fresh, batches[SAVED_AT:], rank, world)
        return trajectory, {key: fresh.metrics()[key] for key in PROGRESS}, evidence


def _in_flight_entry(optimizer_state: dict[str, Any], flatten: bool) -> dict[str, Any]:
    """The first parameter's count of refreshes in flight and whether its first slot is computed."""
    if flatten:
        count = next(key for key in optimizer_state if key.endswith(".shampoo.in_flight"))
        slot = count[: -len("in_flight")] + "refreshes.0."
        computed = next(
            v for k, v in optimizer_state.items() if k.startswith(slot) and k.endswith(".computed")
        )
        return {"in_flight": optimizer_state[count], "computed": bool(local(computed).all())}
    section = next(iter(optimizer_state["state"].values()))["shampoo"]
    factor = next(value for value in section["refreshes"]["0"].values() if isinstance(value, dict))
    return {"in_flight": section["in_flight"], "computed": bool(local(factor["computed"]).all())}


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for step_a, step_b in zip(a, b, strict=True) for x, y in zip(step_a, step_b))


# ------------------------------------------------------------------ one process


@functools.cache
def _one_process_reference(kind: str) -> tuple[list, dict]:
    return _reference(_model, kind, _batches())


@pytest.mark.parametrize("kind", PRECONDITIONERS)
@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("api", ["state_dict", "optimizer"])
@pytest.mark.parametrize("transport", ["memory", "dcp"])
@pytest.mark.parametrize("computed", [True, False], ids=["computed", "computing"])
def test_one_process_round_trip_continues_bitwise(
    kind: str, flatten: bool, api: str, transport: str, computed: bool, tmp_path: Path
) -> None:
    trajectory, progress, evidence = _resume(
        _model, kind, _batches(), api, flatten, transport, computed, str(tmp_path)
    )
    assert evidence == {"in_flight": 1, "computed": computed}
    reference, reference_progress = _one_process_reference(kind)
    assert _same(trajectory, reference)
    assert progress == reference_progress


def test_more_refreshes_in_flight_than_slots_survive_a_passed_dict_and_warn_through_dcp_load(
    tmp_path: Path,
) -> None:
    """Lag 2, frequency 3: one slot per parameter. A refresh requested at step 9 puts a second one in
    flight; passing the saved dict keeps both, dcp.load into a fresh optimizer keeps the slot only."""
    batches = _batches()
    model = _model()
    with Shampoo(model.parameters(), **OPTIONS) as opt:
        train_shards(model, opt, batches[:8])
        opt.request_refresh()
        train_shards(model, opt, batches[8:SAVED_AT])
        assert opt.metrics()["in_flight"] == 2
        preconditioned = sum(any(key.startswith("factor_") for key in state) for state in opt.state.values())
        saved = copy.deepcopy(get_optimizer_state_dict(model, opt))  # the live state trains on below
        dcp.save({"optimizer": saved}, checkpoint_id=str(tmp_path))
        weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
        reference = train_shards(model, opt, batches[SAVED_AT:])
    for transport in ("memory", "dcp"):
        second = _model(seed=5)
        second.load_state_dict(weights)
        with Shampoo(second.parameters(), **OPTIONS) as fresh:
            state = saved
            if transport == "dcp":
                state = {"optimizer": get_optimizer_state_dict(second, fresh)}
                dcp.load(state, checkpoint_id=str(tmp_path))
                lost = rf"1 saved refresh\(es\) in flight of {preconditioned} parameters are missing"
                with pytest.warns(UserWarning, match=lost):
                    set_optimizer_state_dict(second, fresh, state["optimizer"])
            else:
                set_optimizer_state_dict(second, fresh, state)
            assert fresh.metrics()["in_flight"] == (2 if transport == "memory" else 1)
            resumed = train_shards(second, fresh, batches[SAVED_AT:])
            assert _same(resumed, reference) == (transport == "memory")


@pytest.mark.parametrize("kind", PRECONDITIONERS)
def test_the_sectioned_form_earlier_versions_saved_still_resumes_bitwise(kind: str) -> None:
    model, opt, gate = _first_run(_model, kind, _batches(), computed=False)
    old = unpack(opt.state_dict())
    assert "shampoo" in old and all("shampoo" not in state for state in old["state"].values())
    buffer = io.BytesIO()
    torch.save((model.state_dict(), old), buffer)
    gate.restore()
    opt.close()
    buffer.seek(0)
    weights, old = torch.load(buffer, weights_only=True)
    second = _model(seed=5)
    second.load_state_dict(weights)
    with Shampoo(second.parameters(), **KINDS[kind], **OPTIONS) as fresh:
        fresh.load_state_dict(old)
        trajectory = train_shards(second, fresh, _batches()[SAVED_AT:])
        progress = {key: fresh.metrics()[key] for key in PROGRESS}
    assert _same(trajectory, _one_process_reference(kind)[0])
    assert progress == _one_process_reference(kind)[1]


# ------------------------------------------------------------------ FSDP2, 2 ranks


def _fsdp_model(seed: int = 0) -> nn.Module:
    """Rows 16 and 8 split 8+8 and 4+4: block_size 8 and 4 divide the shards (see test_distributed_fsdp)."""
    from torch.distributed.fsdp import fully_shard

    model = _model(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


FSDP_CASES = [
    (kind, api, flatten, transport)
    for kind in PRECONDITIONERS
    for api, flatten, transport in [
        ("state_dict", False, "memory"),
        ("state_dict", True, "dcp"),
        ("optimizer", False, "dcp"),
        ("optimizer", True, "memory"),
    ]
]


def _fsdp_scenarios(rank: int, world_size: int, directory: str) -> dict[str, Any]:
    torch.manual_seed(0)
    batches = _batches()
    out: dict[str, Any] = {}
    for kind in PRECONDITIONERS:
        out[kind] = _reference(_fsdp_model, kind, batches, rank, world_size)
    for number, (kind, api, flatten, transport) in enumerate(FSDP_CASES):
        computed = (number + rank) % 2 == 0  # the ranks differ: one has the results, the other not yet
        out[(kind, api, flatten, transport)] = (
            computed,
            *_resume(
                _fsdp_model, kind, batches, api, flatten, transport, computed, f"{directory}/{number}", rank,
                world_size,
            ),
        )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(_fsdp_scenarios, str(tmp_path_factory.mktemp("dcp_fsdp")))


@pytest.mark.parametrize("case", FSDP_CASES, ids=lambda case: "-".join(map(str, case)))
def test_fsdp_round_trip_continues_bitwise_on_every_rank(
    fsdp_runs: list[dict[str, Any]], case: tuple
) -> None:
    kind = case[0]
    for result in fsdp_runs:
        computed, trajectory, progress, evidence = result[case]
        assert evidence == {"in_flight": 1, "computed": computed}
        reference, reference_progress = result[kind]
        assert _same(trajectory, reference)
        assert progress["step"] == reference_progress["step"] == STEPS
        assert progress == reference_progress
    # The ranks hold different shards: the check above compared each rank with its own reference.
    assert not torch.equal(fsdp_runs[0][case][1][-1][0], fsdp_runs[1][case][1][-1][0])
