"""One contract every preconditioner keeps (root inverse and eigenvalue corrected, one process).

Refresh modes agree bitwise, checkpoints resume bitwise (also with a refresh in flight), copies step like
the original, bad gradients are isolated, bad checkpoints are refused whole, a failed refresh never
half-applies a step, and a compiled step is the eager step. The math of each preconditioner is checked
against the fp64 reference in test_reference_equivalence.py.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lightning_shampoo import Shampoo, refresh
from lightning_shampoo.checkpoint import load_sharded_state_dict, sharded_state_dict
from lightning_shampoo.statedict import unpack

PRECONDITIONERS = ["root_inverse", "eigenvalue_corrected"]
# Refreshes at steps 2, 5, 8, …; block_size 8 cuts the 16-wide layers into several same-shaped blocks.
FAST = dict(lr=1e-2, start_preconditioning_step=2, precondition_frequency=3, block_size=8)


@pytest.fixture(params=PRECONDITIONERS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def _train(model: nn.Module, opt: Shampoo, batches: list[Any]) -> list[float]:
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _run(kind: str, steps: int, **options: Any) -> tuple[list[float], list[torch.Tensor]]:
    model = _model()
    with Shampoo(model.parameters(), **FAST, preconditioner=kind, **options) as opt:
        losses = _train(model, opt, _batches(steps))
    return losses, [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _state_snapshot(opt: Shampoo) -> dict[str, Any]:
    return copy.deepcopy(opt.state_dict())


def _equal_states(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# ------------------------------------------------------------------ refresh modes and checkpoints


@pytest.mark.parametrize("lag", [0, 2])
def test_async_is_bitwise_sync_with_the_same_lag(kind: str, lag: int) -> None:
    reference = _run(kind, 12, refresh="sync", refresh_lag=lag)
    losses, params = _run(kind, 12, refresh="async", refresh_lag=lag)
    assert losses == reference[0] and _same(params, reference[1])


@pytest.mark.parametrize("lag", [0, 2])
def test_async_is_bitwise_sync_with_the_same_lag_for_the_pseudo_inverse(lag: int) -> None:
    reference = _run("root_inverse", 12, refresh="sync", refresh_lag=lag, pseudo_inverse=True)
    losses, params = _run("root_inverse", 12, refresh="async", refresh_lag=lag, pseudo_inverse=True)
    assert losses == reference[0] and _same(params, reference[1])
    assert losses != _run("root_inverse", 12, refresh="sync", refresh_lag=lag)[0]  # the option took effect


@pytest.mark.parametrize("resume", ["sync", "async"])
def test_checkpoint_with_a_refresh_in_flight_resumes_bitwise(kind: str, resume: str) -> None:
    batches = _batches(16)
    reference = _run(kind, 16, refresh="async", refresh_lag=2)
    model = _model()
    opt = Shampoo(model.parameters(), **FAST, preconditioner=kind, refresh="async", refresh_lag=2)
    losses = _train(model, opt, batches[:9])  # step 8 refreshed, installs at 10: in flight
    state = opt.state_dict()
    assert [ticket["step"] for ticket in unpack(state)["shampoo"]["engine"]["pending"]] == [8]
    buffer = io.BytesIO()
    torch.save((model.state_dict(), state), buffer)
    buffer.seek(0)
    model_state, optimizer_state = torch.load(buffer, weights_only=True)
    opt.close()
    second = _model(seed=1)
    second.load_state_dict(model_state)
    with Shampoo(second.parameters(), **FAST, preconditioner=kind, refresh=resume, refresh_lag=2) as opt2:
        opt2.load_state_dict(optimizer_state)
        losses += _train(second, opt2, batches[9:])
    assert losses == reference[0]
    assert _same([p.detach() for p in second.parameters()], reference[1])


def test_per_rank_checkpoint_stores_tensors_only_and_resumes_bitwise(kind: str, tmp_path: Any) -> None:
    batches = _batches(12)
    reference = _run(kind, 12, refresh_lag=1)
    model = _model()
    opt = Shampoo(model.parameters(), **FAST, preconditioner=kind, refresh_lag=1)
    losses = _train(model, opt, batches[:8])  # step 8 refreshed, installs at 9: in flight
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save({"optimizer": sharded_state_dict(opt)}, checkpoint_id=tmp_path)
    # Every entry is a tensor: loading unpickles nothing (DCP unpickles its non-tensor entries).
    items = dcp.FileSystemReader(tmp_path).read_metadata().state_dict_metadata
    assert items and all(isinstance(item, TensorStorageMetadata) for item in items.values())
    second = _model(seed=1)
    second.load_state_dict(model.state_dict())
    opt2 = Shampoo(second.parameters(), **FAST, preconditioner=kind, refresh_lag=1)
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        load_sharded_state_dict(opt2, tmp_path)
    losses += _train(second, opt2, batches[8:])
    assert losses == reference[0]
    assert _same([p.detach() for p in second.parameters()], reference[1])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_step_exactly_like_the_original(kind: str, how: str) -> None:
    model = _model()
    opt = Shampoo(model.parameters(), **FAST, preconditioner=kind, refresh="async", refresh_lag=2)
    batches = _batches(14)
    _train(model, opt, batches[:6])  # step 5's refresh is in flight
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt), buffer)
        buffer.seek(0)
        model2, opt2 = torch.load(buffer, weights_only=False)
    assert _train(model2, opt2, batches[6:]) == _train(model, opt, batches[6:])
    assert _same(list(model.parameters()), list(model2.parameters()))
    assert opt2.metrics()["step"] == opt.metrics()["step"] == 14
    opt.close()
    opt2.close()


# ------------------------------------------------------------------ bad gradients


def test_a_nonfinite_gradient_skips_only_its_parameter(kind: str) -> None:
    model = _model()
    opt = Shampoo(model.parameters(), **FAST, preconditioner=kind)
    _train(model, opt, _batches(3))  # the skipped step 4 neither refreshes nor installs
    weight, other = model[0].weight, model[2].weight
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[weight].items()}
    weights = (weight.detach().clone(), other.detach().clone())
    with pytest.warns(RuntimeWarning, match="non-finite gradient in parameter 0 of its group"):
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.randn(4, 12)), torch.randn(4, 3)).backward()
        weight.grad[0, 0] = float("nan")
        opt.step()
    assert torch.equal(weight, weights[0]) and not torch.equal(other, weights[1])
    assert _equal_states(before, dict(opt.state[weight]))
    assert opt.metrics()["nonfinite_skips"] == 1


def test_a_gradient_that_would_overflow_the_statistics_is_skipped_and_training_goes_on(kind: str) -> None:
    model = _model()
    opt = Shampoo(model.parameters(), **FAST, preconditioner=kind)
    batches = _batches(12)
    _train(model, opt, batches[:3])
    weight = model[0].weight
    before = weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"gradient too large \(max \|g\| = .*overflow fp32"):
        opt.zero_grad()
        nn.functional.mse_loss(model(batches[3][0]), batches[3][1]).backward()
        weight.grad.mul_(1e25)  # finite, but its outer products are not in fp32
        opt.step()
    assert torch.equal(weight, before)
    accepted = opt.metrics()["roots_accepted"]
    _train(model, opt, batches[4:])  # refreshes at 5, 8, 11
    for key, value in opt.state[weight].items():
        if isinstance(value, torch.Tensor):
            assert value.isfinite().all(), key
    assert not torch.equal(weight, before)
    assert opt.metrics()["roots_accepted"] > accepted and opt.metrics()["rejected_refreshes"] == 0


# ------------------------------------------------------------------ bad checkpoints


def _flip_exponent_bit(tensor: torch.Tensor, index: tuple[int, ...]) -> None:
    """Flip a high exponent bit of one fp32 entry (what a corrupted byte on disk does)."""
    bits = tensor.view(torch.int32)
    bits[index] ^= 1 << 29


@pytest.mark.parametrize("corruption", ["nan_factor", "flipped_byte_in_matrix", "negative_second_moment"])
def test_a_corrupt_checkpoint_is_refused_and_nothing_changes(kind: str, corruption: str) -> None:
    model = _model()
    opt = Shampoo(model.parameters(), **FAST, preconditioner=kind)
    _train(model, opt, _batches(6))
    saved = copy.deepcopy(opt.state_dict())
    matrix = "root_0_0" if kind == "root_inverse" else "basis_0_0"
    if corruption == "nan_factor":
        saved["state"][2]["factor_0_1"][0, 1, 1] = float("nan")
    elif corruption == "flipped_byte_in_matrix":
        _flip_exponent_bit(saved["state"][0][matrix], (0, 0, 1))
    else:
        key = "graft_sq" if kind == "root_inverse" else "exp_avg_sq"
        saved["state"][0][key][0, 0] = -1.0
    fresh_model = _model()
    fresh = Shampoo(fresh_model.parameters(), **FAST, preconditioner=kind)
    _train(fresh_model, fresh, _batches(2, seed=5))
    before = _state_snapshot(fresh)
    with pytest.raises(ValueError, match="corrupt"):
        fresh.load_state_dict(saved)
    assert _equal_states(before, _state_snapshot(fresh))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda extra: extra.pop("engine"), None),  # a section without refreshes in flight is fine
        (lambda extra: extra.update(step=2.5), "step 2.5, not an integer"),
        (lambda extra: extra.update(counters={"refreshes": "many"}), "counters"),
        (lambda extra: extra["engine"]["pending"][0].pop("install_step"), "refresh in flight is malformed"),
        (lambda extra: extra["engine"]["pending"][0]["snapshots"][0].update(param_index=99), "out of range"),
        (lambda extra: extra.update(preconditioner="other"), "preconditioner='other'"),
    ],
)
def test_a_malformed_shampoo_section_is_refused_before_anything_is_replaced(
    kind: str, damage: Any, message: str | None
) -> None:
    model = _model()
    opt = Shampoo(model.parameters(), **FAST, preconditioner=kind, refresh_lag=2)
    _train(model, opt, _batches(6))  # step 5's refresh installs at 7: in flight
    saved = unpack(copy.deepcopy(opt.state_dict()))  # the sectioned form, as earlier versions saved it
    damage(saved["shampoo"])
    fresh = Shampoo(_model().parameters(), **FAST, preconditioner=kind, refresh_lag=2)
    if message is None:
        fresh.load_state_dict(saved)
        return
    before = _state_snapshot(fresh)
    with pytest.raises(ValueError, match=message):
        fresh.load_state_dict(saved)
    assert _equal_states(before, _state_snapshot(fresh))
    assert not fresh.state


# ------------------------------------------------------------------ failures, compile, metrics


def test_a_failing_sync_refresh_never_half_applies_a_step(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = refresh.compute_refresh
    failing = {"at": 5}

    def compute(snapshots: Any, settings: Any, *workers: int) -> Any:
        if failing["at"] and snapshots and failing["at"] == step[0]:
            raise MemoryError("no memory for the eigendecomposition")
        return real(snapshots, settings, *workers)

    step = [0]
    monkeypatch.setattr(refresh, "compute_refresh", compute)
    model = _model()
    opt = Shampoo(model.parameters(), **FAST, preconditioner=kind)
    batches = _batches(10)
    for x, y in batches[:5]:
        step[0] += 1
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()  # step 5's refresh fails: the step still applies whole, with the previous matrices
    assert all(opt.state[p]["step"] == 5 for p in model.parameters())
    roots_after_5 = {
        k: v.clone() for k, v in opt.state[model[0].weight].items() if isinstance(v, torch.Tensor)
    }
    weights = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.mse_loss(model(batches[5][0]), batches[5][1]).backward()
    with pytest.raises(RuntimeError, match="refresh snapshotted at step 5 failed") as raised:
        opt.step()
    assert isinstance(raised.value.__cause__, MemoryError)
    # The step that reported it changed nothing at all.
    assert _same([p.detach() for p in model.parameters()], weights)
    assert opt.metrics()["step"] == 5
    state = opt.state[model[0].weight]
    assert all(torch.equal(state[k], v) for k, v in roots_after_5.items())
    failing["at"] = 0
    _train(model, opt, batches[5:])  # and the run goes on
    assert opt.metrics()["step"] == 10


def test_a_compiled_step_is_the_eager_step(kind: str) -> None:
    eager = _run(kind, 9)
    model = _model()
    opt = Shampoo(model.parameters(), **FAST, preconditioner=kind)
    opt.step = torch.compile(opt.step)  # type: ignore[method-assign]
    losses = _train(model, opt, _batches(9))
    assert losses == eager[0] and _same([p.detach() for p in model.parameters()], eager[1])
    assert opt.metrics()["step"] == 9 and opt.metrics()["refreshes"] == 3


def test_metrics_are_plain_finite_floats(kind: str) -> None:
    model = _model()
    with Shampoo(model.parameters(), **FAST, preconditioner=kind, refresh="async", refresh_lag=1) as opt:
        _train(model, opt, _batches(9))
        metrics = opt.metrics()
    assert all(type(value) is float and math.isfinite(value) for value in metrics.values())
    assert metrics["refreshes"] == 3 and metrics["installs"] == 3 and metrics["roots_accepted"] > 0
    weights = [p for p in model.parameters() if p.dim() == 2]  # the biases have no factor (factor ratio)
    assert all(opt.state[p]["preconditioned"] for p in weights)


def test_bf16_parameters_train_with_fp32_state(kind: str) -> None:
    model = _model().to(torch.bfloat16)
    opt = Shampoo(model.parameters(), **FAST, preconditioner=kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in _batches(8):
            opt.zero_grad()
            nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
            opt.step()
    assert all(p.dtype == torch.bfloat16 and p.isfinite().all() for p in model.parameters())
    for state in opt.state.values():
        assert all(v.dtype == torch.float32 for v in state.values() if isinstance(v, torch.Tensor))


# ------------------------------------------------------------------ low-precision factors


def test_compact_storage_checkpoint_and_refresh_modes_stay_bitwise(kind: str) -> None:
    """Compact storage (bfloat16 roots beside float32 factor triangles; bfloat16 factors and bases): the
    stochastic rounding is seeded by step and parameter, so async is still bitwise sync, and a resumed run
    (weights-only load) is bitwise the uninterrupted one."""
    options = dict(refresh_lag=2, factor_dtype=torch.bfloat16)
    reference = _run(kind, 14, refresh="sync", **options)
    losses, params = _run(kind, 14, refresh="async", **options)
    assert losses == reference[0] and _same(params, reference[1])
    model = _model()
    opt = Shampoo(model.parameters(), **FAST, preconditioner=kind, **options)
    batches = _batches(14)
    losses = _train(model, opt, batches[:9])
    matrix = "root_0_0" if kind == "root_inverse" else "basis_0_0"
    state = opt.state[model[0].weight]
    factor_dtype = torch.float32 if kind == "root_inverse" else torch.bfloat16
    assert state["factor_0_0"].dtype == factor_dtype and state[matrix].dtype == torch.bfloat16
    assert state["exp_avg"].dtype == torch.float32
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    second = _model(seed=1)
    second.load_state_dict(model.state_dict())
    opt2 = Shampoo(second.parameters(), **FAST, preconditioner=kind, **options)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.state[second[0].weight]["factor_0_0"].dtype == factor_dtype
    losses += _train(second, opt2, batches[9:])
    assert losses == reference[0] and _same([p.detach() for p in second.parameters()], reference[1])


def test_stochastic_rounding_keeps_the_factor_ema_unbiased() -> None:
    """A slowly decaying EMA (β2 = 0.999) in bfloat16: rounding to nearest would freeze it; stochastic
    rounding follows the float32 EMA within bfloat16's relative precision."""
    from lightning_shampoo.kronecker import update_statistics

    g = torch.Generator().manual_seed(0)
    exact = torch.zeros(1, 8, 8)
    low = torch.zeros(1, 8, 8, dtype=torch.bfloat16)
    nearest = torch.zeros(1, 8, 8, dtype=torch.bfloat16)
    scale = 1.0
    for step in range(3000):
        grad = scale * torch.randn(1, 8, 16, generator=g)
        scale = 1.0 if step < 1000 else 0.3  # the statistics must decay by 10x after step 1000
        update_statistics([exact], grad, 0.999)
        update_statistics([low], grad, 0.999, torch.Generator().manual_seed(step))
        nearest.copy_((0.999 * nearest.float() + 0.001 * grad @ grad.mT).to(torch.bfloat16))
    trace = torch.diagonal(exact, dim1=-2, dim2=-1).sum()
    # Each entry random-walks by about half an ulp per step, damped by the EMA: a few % of spread.
    assert abs(float(torch.diagonal(low.float(), dim1=-2, dim2=-1).sum() / trace) - 1) < 0.05
    assert torch.equal(low, low.mT)
    assert float(torch.diagonal(nearest.float(), dim1=-2, dim2=-1).sum() / trace) > 1.5  # frozen high
