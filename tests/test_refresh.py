"""The refresh engine: async vs sync, policies, failures, lifecycle, checkpoints and metrics."""

import gc
import io
import os
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import warnings

import pytest
import torch
from torch import nn

from lightning_shampoo import FunctionPolicy, OnRequest, Shampoo, _cpu, refresh
from lightning_shampoo.refresh import EveryNSteps
from lightning_shampoo.statedict import unpack

# Roots at steps 2, 5, 8, …; block_size 8 cuts the 16-wide layers into several same-shaped blocks.
FAST = dict(lr=1e-2, start_preconditioning_step=2, precondition_frequency=3, block_size=8)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def _train(model, opt, batches, after_step=None):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if after_step is not None:
            after_step(opt)
    return losses


def _workers():
    return [t for t in threading.enumerate() if t.name == "shampoo-refresh"]


@pytest.fixture(autouse=True)
def _no_worker_outlives_a_test():
    yield
    gc.collect()
    assert not _workers(), "a refresh worker outlived its test"


@pytest.fixture
def compute_threads(monkeypatch):
    """Wraps the real ``compute_refresh`` to record the thread of every call and the threads it computes on
    (its helpers, or the calling thread's count)."""
    calls = []
    real = refresh.compute_refresh

    def recording(snapshots, settings, *workers):
        calls.append((threading.current_thread().name, workers[0] if workers else torch.get_num_threads()))
        return real(snapshots, settings, *workers)

    monkeypatch.setattr(refresh, "compute_refresh", recording)
    return calls


def _run(steps, **options):
    model = _model()
    with Shampoo(model.parameters(), **FAST, **options) as opt:
        losses = _train(model, opt, _batches(steps))
        return losses, [p.detach().clone() for p in model.parameters()], opt.metrics()


@pytest.mark.parametrize("lag, threads", [(0, None), (2, None), (7, None), (2, 2)])
def test_async_is_bitwise_sync_with_the_same_lag(lag, threads, compute_threads):
    sync_losses, sync_params, sync_metrics = _run(
        30, refresh="sync", refresh_lag=lag, refresh_threads=threads
    )
    async_losses, async_params, async_metrics = _run(
        30, refresh="async", refresh_lag=lag, refresh_threads=threads
    )
    assert async_losses == sync_losses
    assert all(torch.equal(a, s) for a, s in zip(async_params, sync_params))
    # Refreshes at 2, 5, …, 29; those installed after step 30 are still in flight (lag 7 > frequency 3:
    # two at a time). Sync computed in the training thread, async in the worker, each on its own count of
    # threads (2 and 1 on two cores, by default): the results do not depend on it.
    assert sync_metrics["refreshes"] == async_metrics["refreshes"] == 10
    assert async_metrics["staleness"] == sync_metrics["staleness"] == lag
    in_flight = sum(t + lag > 30 for t in range(2, 31, 3))
    assert async_metrics["in_flight"] == sync_metrics["in_flight"] == in_flight
    assert {name for name, _ in compute_threads[:10]} == {threading.current_thread().name}
    assert {name for name, _ in compute_threads[10:]} == {"shampoo-refresh"}
    training = torch.get_num_threads()
    worker = threads or _cpu.background_refresh_threads(training)
    assert {count for _, count in compute_threads[:10]} == {threads or training}
    assert {count for _, count in compute_threads[10:]} == {worker}
    # The lag matters: the comparison above is not between two identical configurations.
    if lag:
        other_losses, _, _ = _run(30, refresh="sync", refresh_lag=0)
        assert other_losses != sync_losses


@pytest.fixture
def two_training_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_a_background_worker_takes_only_the_cores_cpu_training_leaves(two_training_threads, compute_threads):
    """More OpenMP threads than cores make libgomp throttle every team (see ``_cpu``): next to CPU training
    the worker computes on the cores training leaves, at least one; sync keeps training's count."""
    assert _cpu.background_refresh_threads(2, cpus=2) == 1
    assert _cpu.background_refresh_threads(2, cpus=8) == 6
    assert _cpu.background_refresh_threads(8, cpus=8) == 1
    _run(8, refresh="sync")
    _run(8, refresh="async")
    worker = {count for name, count in compute_threads if name == "shampoo-refresh"}
    training = {count for name, count in compute_threads if name != "shampoo-refresh"}
    assert training == {2} and worker == {_cpu.background_refresh_threads(2)}
    assert torch.get_num_threads() == 2  # the training thread's count is left alone


def test_a_wide_factor_is_bitwise_too_whatever_the_refresh_threads(two_training_threads, compute_threads):
    # MKL's eigh rounds differently with 1 and 2 threads from d ≈ 700 on. Sync computes on 2 threads and
    # the worker next to 2-thread training on 1; every matrix is decomposed on one thread either way.
    def run(mode):
        torch.manual_seed(0)
        layer = nn.Linear(720, 2)
        g = torch.Generator().manual_seed(1)
        options = dict(start_preconditioning_step=1, refresh_lag=1)
        with Shampoo(layer.parameters(), lr=1e-2, refresh=mode, **options) as opt:
            for _ in range(2):  # roots of step 1 used at step 2
                opt.zero_grad()
                layer(torch.randn(32, 720, generator=g)).square().mean().backward()
                opt.step()
            return layer.weight.detach().clone(), opt.metrics()["installs"]

    (sync_weight, sync_installs), (async_weight, async_installs) = run("sync"), run("async")
    assert sync_installs == async_installs == 1
    assert torch.equal(async_weight, sync_weight)
    worker = _cpu.background_refresh_threads(2)
    assert [count for _, count in compute_threads] == [2, worker]  # different counts (on up to 3 cores)


def test_the_worker_thread_count_and_priority_leave_the_training_thread_alone(monkeypatch):
    started, release = threading.Event(), threading.Event()
    seen, niceness = [], []
    real = refresh.compute_refresh

    def gated(snapshots, settings, *workers):
        seen.append(workers[0] if workers else torch.get_num_threads())
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        if len(seen) > 1:  # the first refresh installs at once (its step waits): hold the second
            started.set()
            release.wait()
        return real(snapshots, settings, *workers)

    monkeypatch.setattr(refresh, "compute_refresh", gated)
    training_threads = torch.get_num_threads()
    training_niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    model = _model()
    with Shampoo(model.parameters(), **FAST, refresh="async", refresh_lag=3, refresh_threads=3) as opt:
        _train(model, opt, _batches(5))  # refreshes at steps 2 (installed at once) and 5 (at 8)
        assert started.wait(10)
        assert seen == [3, 3]
        # While the worker computes with 3 threads, the training thread keeps its own count; the worker
        # runs niced below it (Linux) and the training thread keeps its priority.
        assert torch.get_num_threads() == training_threads
        assert niceness == [min(19, training_niceness + refresh.WORKER_NICENESS)] * 2
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == training_niceness
        _train(model, opt, _batches(1))
        release.set()
        _train(model, opt, _batches(3))
    assert torch.get_num_threads() == training_threads


def test_worker_failure_is_reraised_at_the_next_step_with_its_traceback(monkeypatch):
    def failing(snapshots, settings, *workers):
        raise ValueError("factor exploded")

    monkeypatch.setattr(refresh, "compute_refresh", failing)
    model = _model()
    batches = _batches(4)
    with Shampoo(model.parameters(), **FAST, refresh="async", refresh_lag=0) as opt:
        _train(model, opt, batches[:2])  # step 2 refreshes; lag 0 waits for the (failed) result
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match="step 2 failed") as raised:
            _train(model, opt, batches[2:3])
        cause = raised.value.__cause__
        assert isinstance(cause, ValueError)
        assert "failing" in [frame.name for frame in traceback.extract_tb(cause.__traceback__)]
        # The failing step() changed nothing; the failed refresh installed nothing and is reported once.
        assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert not opt.state[model[0].weight]["preconditioned"]
        assert opt.metrics()["in_flight"] == 0
        _train(model, opt, batches[2:])


def test_drain_reraises_a_worker_failure(monkeypatch):
    monkeypatch.setattr(refresh, "compute_refresh", lambda snapshots, settings, *workers: 1 / 0)
    model = _model()
    with Shampoo(model.parameters(), **FAST, refresh="best_effort", refresh_lag=5) as opt:
        _train(model, opt, _batches(2))
        with pytest.raises(RuntimeError) as raised:
            opt.drain()
        assert isinstance(raised.value.__cause__, ZeroDivisionError)


def test_close_stops_the_worker_and_stepping_again_resumes_the_same_trajectory():
    batches = _batches(20)
    reference, reference_params, _ = _run(20, refresh="sync", refresh_lag=4)

    model = _model()
    opt = Shampoo(model.parameters(), **FAST, refresh="async", refresh_lag=4)
    assert not _workers()  # started lazily, at the first refresh
    losses = _train(model, opt, batches[:1])
    assert not _workers()
    losses += _train(model, opt, batches[1:9])
    assert len(_workers()) == 1
    assert opt.metrics()["in_flight"] >= 1
    opt.close()
    opt.close()
    assert not _workers()
    losses += _train(model, opt, batches[9:])
    assert losses == reference
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), reference_params))
    opt.close()
    assert not _workers()


def test_dropping_the_optimizer_stops_its_worker():
    model = _model()
    opt = Shampoo(model.parameters(), **FAST, refresh="async")
    _train(model, opt, _batches(3))
    assert len(_workers()) == 1
    del opt
    gc.collect()
    assert not _workers()


def test_interpreter_exit_stops_an_idle_and_a_busy_worker():
    script = textwrap.dedent(
        """
        import time, torch
        from torch import nn
        from lightning_shampoo import Shampoo, refresh
        real, delay = refresh.compute_refresh, [0.0]
        def slow(snapshots, settings, *workers):
            time.sleep(delay[0])
            return real(snapshots, settings, *workers)
        refresh.compute_refresh = slow
        def train(opt, model):
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(8, 4)).square().sum().backward()
                opt.step()
        idle_model, busy_model = nn.Linear(4, 4), nn.Linear(4, 4)
        idle = Shampoo(idle_model.parameters(), refresh="async", start_preconditioning_step=1)
        train(idle, idle_model)
        idle.drain()
        delay[0] = 1.0
        busy = Shampoo(busy_model.parameters(), refresh="async", start_preconditioning_step=1)
        train(busy, busy_model)
        print("done", flush=True)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"


def _gate_compute(monkeypatch):
    """Make every root computation wait for the returned event (the real computation follows)."""
    gate = threading.Event()
    real = refresh.compute_refresh

    def gated(snapshots, settings, *workers):
        gate.wait()
        return real(snapshots, settings, *workers)

    monkeypatch.setattr(refresh, "compute_refresh", gated)
    return gate


@pytest.mark.parametrize("saved", ["in_flight", "drained"])
@pytest.mark.parametrize("resume", ["async", "sync"])
def test_checkpoint_with_a_pending_refresh_resumes_bitwise(saved, resume, monkeypatch):
    batches = _batches(24)
    reference, reference_params, _ = _run(24, refresh="async", refresh_lag=4)

    gate = _gate_compute(monkeypatch)
    first = _model()
    opt1 = Shampoo(first.parameters(), **FAST, refresh="async", refresh_lag=4)
    gate.set()
    losses = _train(first, opt1, batches[:10])
    opt1.drain()  # step 8's roots, due at 12, are computed before the gate closes
    gate.clear()
    losses += _train(first, opt1, batches[10:12])  # step 11 refreshes, installs at 15: in flight
    if saved == "drained":
        gate.set()
        opt1.drain()
    state = opt1.state_dict()
    pending = unpack(state)["shampoo"]["engine"]["pending"]
    assert [item["step"] for item in pending] == [11]
    assert ("results" in pending[0]) == (saved == "drained")
    buffer = io.BytesIO()
    torch.save((first.state_dict(), state), buffer)
    buffer.seek(0)
    model_state, optimizer_state = torch.load(buffer, weights_only=True)
    gate.set()
    opt1.close()

    second = _model(seed=123)
    second.load_state_dict(model_state)
    with Shampoo(second.parameters(), **FAST, refresh=resume, refresh_lag=4) as opt2:
        opt2.load_state_dict(optimizer_state)
        losses += _train(second, opt2, batches[12:])
    assert losses == reference
    assert all(torch.equal(p, r) for p, r in zip(second.parameters(), reference_params))


def test_on_request_refreshes_only_when_asked():
    model = _model()
    with Shampoo(model.parameters(), **FAST, refresh_policy=OnRequest()) as opt:
        _train(model, opt, _batches(6))
        assert opt.metrics()["refreshes"] == 0
        assert not opt.state[model[0].weight]["preconditioned"]
        opt.request_refresh()
        _train(model, opt, _batches(3))
        assert opt.metrics()["refreshes"] == 1
        assert opt.state[model[0].weight]["preconditioned"]


def test_requests_on_the_every_n_schedule_give_the_every_n_trajectory():
    schedule = EveryNSteps(start=2, frequency=3)
    reference, reference_params, _ = _run(15, refresh="async", refresh_lag=2)

    model = _model()

    def request_next(opt):
        if schedule.due(int(opt.metrics()["step"]) + 1):
            opt.request_refresh()

    with Shampoo(
        model.parameters(), **FAST, refresh="async", refresh_lag=2, refresh_policy=OnRequest()
    ) as opt:
        request_next(opt)
        losses = _train(model, opt, _batches(15), after_step=request_next)
    assert losses == reference
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), reference_params))


def test_a_function_policy_decides_the_refresh_steps(compute_threads):
    steps = {3, 4, 9}
    model = _model()
    with Shampoo(model.parameters(), **FAST, refresh_policy=lambda step: step in steps) as opt:
        assert isinstance(opt.policy, FunctionPolicy)
        _train(model, opt, _batches(12))
        assert opt.metrics()["refreshes"] == len(compute_threads) == 3


def test_best_effort_waits_only_at_the_staleness_bound(monkeypatch):
    real = refresh.compute_refresh
    delay = {"seconds": 0.0}

    def slow(snapshots, settings, *workers):
        time.sleep(delay["seconds"])
        return real(snapshots, settings, *workers)

    monkeypatch.setattr(refresh, "compute_refresh", slow)
    model = _model()
    bound = 3
    with Shampoo(model.parameters(), **FAST, refresh="best_effort", refresh_lag=bound) as opt:
        # Roots slower than `bound` steps: each is installed exactly at the bound, after a wait (the first,
        # at step 2, at once).
        delay["seconds"] = 0.3
        staleness = []
        _train(model, opt, _batches(12), after_step=lambda o: staleness.append(o.metrics()["staleness"]))
        metrics = opt.metrics()
        assert metrics["installs"] == 3 and staleness[1] == 0 and set(staleness[-5:]) == {bound}
        assert metrics["wait_s"] > 0.3
        # Roots faster than a step: installed at the first step boundary after the snapshot, no waiting.
        delay["seconds"] = 0.0
        opt.drain()
        waited = opt.metrics()["wait_s"]
        _train(model, opt, _batches(9), after_step=lambda o: time.sleep(0.2))
        metrics = opt.metrics()
        assert metrics["installs"] == 7 and metrics["staleness"] == 1
        assert metrics["wait_s"] == waited


@pytest.mark.parametrize("lag", [0, 2])
def test_a_background_refresh_that_keeps_training_waiting_is_reported_once(monkeypatch, lag):
    """Roots slower than the lag window make every install wait: said once, at the user's line, with what
    to change. With lag 0 waiting is what was asked for, and nothing is said."""
    real = refresh.compute_refresh

    def slow(snapshots, settings, *workers):
        time.sleep(0.1)
        return real(snapshots, settings, *workers)

    monkeypatch.setattr(refresh, "compute_refresh", slow)
    model = _model()
    options = {**FAST, "precondition_frequency": 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Shampoo(model.parameters(), **options, refresh="async", refresh_lag=lag) as opt:
            _train(model, opt, _batches(12))
    late = [w for w in caught if "training waited" in str(w.message)]
    assert opt.metrics()["wait_s"] > 0.3
    if lag == 0:
        assert late == []
    else:
        assert len(late) == 1 and late[0].filename == __file__
        message = str(late[0].message)
        assert all(knob in message for knob in ("precondition_frequency", "refresh_lag", "'sync'"))


def test_metrics_are_plain_floats_with_the_documented_keys():
    # float64 eigendecompositions: their residual is at roundoff (float32 ones': about d·u_32).
    _, _, metrics = _run(12, refresh="async", refresh_lag=2, eigh_dtype=torch.float64)
    expected = {
        "nonfinite_skips", "refreshes", "roots_accepted", "roots_rejected", "rejected_refreshes",
        "max_root_residual", "step", "installs", "in_flight", "refresh_latency_s", "refresh_latency_mean_s",
        "staleness", "staleness_mean", "wait_s",
    }  # fmt: skip
    assert set(metrics) == expected
    assert all(type(value) is float for value in metrics.values())
    # Refreshes at 2, 5, 8, 11; installed at 2 (a parameter's first: at once), 7, 10; 11's is in flight.
    assert metrics["refreshes"] == 4 and metrics["installs"] == 3 and metrics["in_flight"] == 1
    assert metrics["staleness"] == 2 and metrics["staleness_mean"] == (0 + 2 + 2) / 3
    assert 0 < metrics["refresh_latency_s"] < 10 and 0 < metrics["refresh_latency_mean_s"] < 10
    assert 0 <= metrics["wait_s"] < 10
    assert metrics["roots_accepted"] > 0 and metrics["roots_rejected"] == metrics["rejected_refreshes"] == 0
    assert 0 < metrics["max_root_residual"] < 1e-6


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_parameters_first_refresh_installs_at_once_and_later_ones_after_the_lag(mode):
    """Until its first results a parameter trains on the graft alone: they are installed at the refresh
    that computes them, also for a group added later, while the others' keep their lag."""
    model = _model()
    first, added = list(model[:2].parameters()), list(model[2:].parameters())
    installs = []
    with Shampoo(first, **FAST, refresh=mode, refresh_lag=5) as opt:
        for step, batch in enumerate(_batches(12), start=1):
            if step == 7:
                opt.add_param_group({"params": added})
            _train(model, opt, [batch])
            installs.append(opt.metrics()["installs"])
        state = [opt.state[p]["preconditioned"] for p in added]
    # Refreshes at 2, 5, 8, 11: the first group's first at once (step 2), its next at 10 (5 + lag); the
    # added group's first at once (step 8).
    assert installs == [0, 1, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3]
    assert state == [True] * len(added)


def test_async_lag_defaults_to_the_refresh_period():
    _, _, metrics = _run(12, refresh="async")
    assert metrics["staleness"] == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(refresh="later"), "refresh must be one of"),
        (dict(refresh="async", refresh_lag=-1), "refresh_lag"),
        (dict(refresh_threads=0), "refresh_threads"),
        (dict(refresh_policy=3), "refresh_policy"),
    ],
)
def test_invalid_refresh_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Shampoo(_model().parameters(), **kwargs)
