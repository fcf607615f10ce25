"""Figures 1 and 2 and the ablation checked piece by piece: the char-LM convergence tasks and their
learning-rate schedule, the peers' matched settings, a failing peer's row, where the step-time windows
start, and the ablation's unavailable configurations."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim import Optimizer

from benchmarks import ablation, convergence, optimizers, schedules, step_time
from benchmarks.harness import Settings, Table
from benchmarks.models import lm_workload, mlp_workload
from benchmarks.optimizers import Matched, Peer
from lightning_shampoo import Shampoo
from lightning_shampoo.recipes import stdlib_source

CPU = torch.device("cpu")
SETTINGS = Settings(quick=True, threads=1, device=CPU, out_dir=Path("unused"))  # measure() writes nothing


@pytest.fixture(scope="module")
def char_lm() -> convergence.ConvergenceTask:
    return convergence.char_lm_task(quick=True, device=CPU)


def test_char_lm_batches_are_shifted_stdlib_source_windows(char_lm: convergence.ConvergenceTask) -> None:
    inputs, targets = char_lm.sample(torch.Generator().manual_seed(3))
    corpus = stdlib_source(100_000)
    assert inputs.shape == targets.shape == (8, 16)
    for x, y in zip(inputs, targets, strict=True):
        text = bytes(x.tolist()) + bytes(y[-1:].tolist())
        assert text in corpus
        assert torch.equal(x[1:], y[:-1])


def test_char_lm_loss_is_the_next_byte_cross_entropy(char_lm: convergence.ConvergenceTask) -> None:
    torch.manual_seed(0)
    model = char_lm.build()
    inputs, targets = char_lm.sample(torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(inputs).double()
        loss = float(char_lm.loss(model, (inputs, targets)))
    log_probs = logits - logits.exp().sum(-1, keepdim=True).log()
    expected = -log_probs.gather(-1, targets.unsqueeze(-1)).mean()
    assert loss == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("spec", [optimizers.adamw(1e-2), optimizers.shampoo(25, 1e-2)],
                         ids=["adamw", "shampoo"])
def test_quick_char_lm_training_lowers_the_loss(char_lm: convergence.ConvergenceTask,
                                                spec: optimizers.OptimizerSpec) -> None:
    torch.manual_seed(0)
    untrained = char_lm.train_loss(char_lm.build())
    assert untrained == pytest.approx(math.log(256), abs=0.3)  # uniform over the bytes at initialisation
    trajectory = convergence.train(char_lm, spec, seed=0, device=CPU)
    losses = [loss for _, _, loss in trajectory.points]
    assert len(losses) == char_lm.max_steps // char_lm.eval_every
    assert losses[-1] < untrained - 1.0
    assert trajectory.steps_to_target <= char_lm.max_steps
    assert losses[int(trajectory.steps_to_target) // char_lm.eval_every - 1] <= char_lm.target


def test_char_lm_sweeps_pass_the_task_settings(char_lm: convergence.ConvergenceTask) -> None:
    sweeps = char_lm.sweeps()
    assert [spec.options["lr"] for spec in sweeps["AdamW"]] == list(char_lm.lrs["AdamW"])
    assert all(spec.options["betas"] == char_lm.adamw["betas"] == (0.9, 0.95) for spec in sweeps["AdamW"])
    for spec, lr in zip(sweeps["Shampoo"], char_lm.lrs["Shampoo"], strict=True):
        assert spec.kind == "shampoo"
        # Shampoo's defaults (its own refresh frequency), the task's settings on top: none today.
        frequency = inspect.signature(Shampoo).parameters["precondition_frequency"].default
        assert spec.options == {"lr": lr, "precondition_frequency": frequency, **char_lm.shampoo}


def test_char_lm_8k_task_trains_the_recipe_model_on_8192_token_batches() -> None:
    task = convergence.char_lm_8k_task(quick=False, device=CPU)
    inputs, targets = task.sample(torch.Generator().manual_seed(5))
    assert inputs.shape == targets.shape == (64, 128) and inputs.numel() == 8192
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    torch.manual_seed(0)
    model = task.build()
    assert (model.hparams.d_model, model.hparams.n_layers, model.hparams.n_heads) == (128, 2, 4)
    assert task.train_eval[0].shape == (64, 128)
    # A few steps of the real size (each ~0.3 s here): the loss falls from uniform over the bytes.
    few = dataclasses.replace(task, max_steps=4, eval_every=2)
    trajectory = convergence.train(few, few.spec("Shampoo", 3e-3), seed=0, device=CPU)
    assert [step for step, _, _ in trajectory.points] == [2, 4]
    assert trajectory.points[-1][2] < math.log(256) - 0.1 and math.isfinite(trajectory.heldout_loss)


def _lrs_used(optimizer: Optimizer, schedule: schedules.WarmupCosine, steps: int) -> list[float]:
    """The lr of every step of a schedule, read from the parameter's change where the optimizer is SGD."""
    (param,) = optimizer.param_groups[0]["params"]
    scheduler = schedule.attach(optimizer)
    seen = []
    for _ in range(steps):
        before = param.detach().clone()
        param.grad = torch.ones_like(param)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        if isinstance(optimizer, torch.optim.SGD):  # W ← W − lr·1: the step taken is the lr itself
            assert torch.allclose(before - param.detach(), torch.full_like(param, lr))
        seen.append(lr)
    return seen


@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD([p], lr=0.2),
                                  lambda p: Shampoo([p], lr=0.2, start_preconditioning_step=1)],
                         ids=["sgd", "shampoo"])
def test_warmup_cosine_lr_at_each_step(make: Callable[[torch.Tensor], Optimizer]) -> None:
    schedule = schedules.WarmupCosine(warmup_steps=4, total_steps=12, final_fraction=0.1)
    seen = _lrs_used(make(torch.nn.Parameter(torch.zeros(3, 2))), schedule, steps=14)
    peak = 0.2
    # Warmup t/4 · peak; the peak at step 4; cosine halfway (step 8) at (0.1 + 0.9 / 2) · peak; the floor
    # 0.1 · peak from step 12 on.
    assert seen[:4] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert seen[7] == pytest.approx(peak * 0.55)
    assert seen[5] == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8))))
    assert seen[11:] == pytest.approx([0.02] * 3)
    assert all(a > b for a, b in itertools.pairwise(seen[3:12]))  # falling from the peak to the floor


def test_schedule_of_a_task_and_its_bad_input() -> None:
    assert schedules.warmup_cosine(200) == schedules.WarmupCosine(10, 200, 0.1)
    assert schedules.warmup_cosine(10).warmup_steps == 1
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        schedules.WarmupCosine(12, 12)
    with pytest.raises(ValueError, match="share of the peak"):
        schedules.WarmupCosine(1, 12, final_fraction=1.5)
    with pytest.raises(ValueError, match="count from 1"):
        schedules.WarmupCosine(1, 12).factor(0)


def test_ablation_records_options_the_installed_shampoo_does_not_take() -> None:
    assert ablation.unavailable({}) == ""
    assert ablation.unavailable({"no_such_option": 1, "another": 2}) == (
        "unavailable: Shampoo has no option another, no_such_option")
    assert ablation.unavailable({"graft": "no_such_graft"}).startswith("unavailable: ValueError: ")
    task = convergence.digits_task(quick=True, device=CPU)
    entries = ablation.ablate(task, {"classic": {}, "missing": {"no_such_option": 1}}, CPU)
    assert list(entries) == ["AdamW", "classic", "missing"]
    assert entries["missing"] == {"options": {"no_such_option": 1},
                                  "unavailable": "unavailable: Shampoo has no option no_such_option"}
    classic = entries["classic"]
    assert [point["lr"] for point in classic["sweep"]] == list(task.short_lrs["Shampoo"])
    assert all(point["options"]["precondition_frequency"] == 10 for point in classic["sweep"])
    rows = {row[1]: row for row in ablation.rows(task.name, entries)}
    assert rows["AdamW"][5:7] == [1.0, 1.0]
    assert rows["missing"][2:] == [None] * 5 + [entries["missing"]["unavailable"]]
    best = classic["best"]
    assert rows["classic"][2:5] == [best["lr"], best["steps_to_target"], best["seconds_to_target"]]


def test_ablation_records_a_configuration_whose_training_fails_as_failed() -> None:
    task = convergence.digits_task(quick=True, device=CPU)
    # The constructor takes a refresh policy that raises only when a step asks it.
    entries = ablation.ablate(task, {"broken": {"refresh_policy": lambda step: 1 // 0}}, CPU)
    assert entries["broken"]["unavailable"] == "failed: ZeroDivisionError: integer division or modulo by zero"
    assert "best" in entries["AdamW"]


def _frequency_and_more(optimizer: Optimizer) -> dict[str, Any]:
    """Each peer's refresh frequency and blocking, read back where that peer keeps them."""
    group, name = optimizer.param_groups[0], type(optimizer).__module__.split(".")[0]
    if name == "heavyball":
        return {"frequency": round(1 / optimizer.precond_schedule), "dim": group["max_precond_dim"],
                "eps": group["eps"]}
    if "precondition_frequency" in group:  # pytorch_optimizer.SOAP
        return {"frequency": group["precondition_frequency"], "dim": group["max_precondition_dim"],
                "eps": group["eps"]}
    found = {"frequency": optimizer.preconditioning_compute_steps, "eps": group.get("matrix_eps")}
    if hasattr(optimizer, "block_size"):  # ScalableShampoo
        found.update(dim=optimizer.block_size, start=optimizer.start_preconditioning_step,
                     eps=optimizer.matrix_eps, graft=int(optimizer.graft_type))
    return found


EXPECTED: dict[str, dict[str, Any]] = {
    "pytorch_optimizer.Shampoo": {"frequency": 7, "eps": 1e-6},
    "pytorch_optimizer.ScalableShampoo": {"frequency": 7, "dim": 1024, "start": 10, "eps": 1e-6, "graft": 3},
    "pytorch_optimizer.SOAP": {"frequency": 7, "dim": 1024, "eps": 1e-8},
    "heavyball.SOAP": {"frequency": 7, "dim": 1024, "eps": 1e-8},
    "heavyball.KLShampoo": {"frequency": 7, "dim": 1024, "eps": 1e-8},
}


@pytest.mark.parametrize("entry", optimizers.PEERS, ids=lambda entry: entry.title)
def test_peer_settings_reach_the_peer_constructor(entry: Peer) -> None:
    spec = optimizers.peer(entry, precondition_frequency=7, lr=0.0123)
    if spec.factory is None:
        pytest.fail(f"{entry.title}: {spec.unavailable} (the `bench` extra is installed in this project)")
    optimizer = spec.factory(torch.nn.Linear(6, 5).parameters())
    assert optimizer.param_groups[0]["lr"] == 0.0123
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    assert _frequency_and_more(optimizer) == EXPECTED[entry.title]


def test_matched_settings_are_shampoos_defaults() -> None:
    group = Shampoo(torch.nn.Linear(6, 5).parameters()).param_groups[0]
    matched = Matched(0.0123, 7)
    for name in ("block_size", "epsilon", "betas", "graft_beta2", "graft_epsilon"):
        assert group[name] == getattr(matched, name), name
    assert matched.start == 10


def test_heavyball_peers_run_eagerly() -> None:
    import heavyball

    spec = optimizers.peer(next(e for e in optimizers.PEERS if e.title == "heavyball.SOAP"), 10)
    assert spec.factory is not None
    spec.factory(torch.nn.Linear(3, 2).parameters())
    assert heavyball.utils.compile_mode is None and spec.options["compile_step"] is False


@pytest.mark.parametrize("make", [mlp_workload, lm_workload], ids=["mlp", "lm"])
def test_every_peer_steps_on_the_workloads(make: Callable[[bool, torch.device], Any]) -> None:
    workload = make(True, CPU)
    runs = step_time.measure(workload, optimizers.peers(10), step_time.QUICK_PLANS[workload.name], SETTINGS)
    for run in runs:
        assert run.ok, (run.spec.label, run.status)
        assert len(run.step_s) == 2 * step_time.QUICK_PLANS[workload.name].round_steps
        assert all(bool(p.detach().isfinite().all()) for p in run.model.parameters())


def _peer(title: str, settings: Callable[[Matched], dict[str, Any]]) -> Peer:
    module, name = title.rsplit(".", 1)
    return Peer(module, name, settings, notes="")


def test_failing_peers_are_recorded_as_failed_rows() -> None:
    workload = mlp_workload(True, CPU)
    specs = [
        optimizers.adamw(),
        optimizers.peer(_peer("torch.optim.SGD", lambda m: {"lr": -m.lr}), 10),  # its constructor refuses
        optimizers.peer(_peer("torch.optim.LBFGS", lambda m: {"lr": m.lr}), 10),  # step() needs a closure
        optimizers.peer(_peer("no_such_module_here.Shampoo", lambda m: {}), 10),
        optimizers.peer(_peer("torch.optim.NoSuchOptimizer", lambda m: {}), 10),
    ]
    plan = step_time.QUICK_PLANS["mlp"]
    runs = step_time.measure(workload, specs, plan, SETTINGS)
    assert runs[0].ok
    assert runs[1].status.startswith("failed: ValueError: Invalid learning rate")
    assert runs[2].status.startswith("failed: TypeError") and "closure" in runs[2].status
    assert [runs[3].status, runs[4].status] == ["not installed", "not in the installed version"]
    timing, bound = Table("t", []), Table("b", [])
    records = step_time._report(workload, runs, plan, timing, bound, [])
    status_of = {row[1]: row[-1] for row in timing.rows}
    for run in runs[1:]:
        assert status_of[run.spec.label] == run.status == records[run.spec.label]["unavailable"]
    assert records["AdamW"]["step_mean_ratio"] == 1.0


@pytest.mark.parametrize("spec", [optimizers.shampoo(10), optimizers.shampoo(10, refresh="async"),
                                  optimizers.shampoo(100, refresh="async")], ids=lambda spec: spec.label)
def test_timing_starts_at_the_first_steady_refresh(spec: optimizers.OptimizerSpec) -> None:
    """The first refresh installs at once (an async step waits for it): timing starts at the second."""
    model = torch.nn.Linear(4, 3)
    assert spec.factory is not None
    optimizer = spec.factory(model.parameters())
    seen = []
    for _ in range(step_time.FULL_PLANS["mlp"].warmup_steps(spec) + 1):
        model(torch.randn(2, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        seen.append(optimizer.metrics())
    optimizers.close(optimizer)
    warm, first_timed = seen[-2], seen[-1]
    assert warm["installs"] == warm["refreshes"] == 1  # the first refresh, installed at once, is warm-up
    assert first_timed["refreshes"] == 2  # and the first window starts at the next refresh


def test_whole_period_windows() -> None:
    plan = step_time.FULL_PLANS["lm"]
    f10, f100, adamw = optimizers.shampoo(10), optimizers.shampoo(100), optimizers.adamw()
    assert [plan.steps_per_round(s) for s in (adamw, f10, f100)] == [20, 20, 34]
    assert [plan.window(s) for s in (adamw, f10, f100)] == [20, 20, 100]
    # Two periods of nine 1 s steps and one 11 s refresh: every window mean is 2 s; a leftover ignored.
    times = ([11.0] + [1.0] * 9) * 2 + [50.0]
    assert step_time.window_means(times, 10) == [2.0, 2.0]
    assert step_time.window_means([3.0, 5.0], 10) == [4.0]


def test_best_table_names_the_fastest_lr_where_it_is_not_the_fewest_steps(
        char_lm: convergence.ConvergenceTask) -> None:
    def row(lr: float, steps: float, seconds: float) -> dict[str, float]:
        return {"lr": lr, "steps_to_target": steps, "seconds_to_target": seconds}

    summaries = {"AdamW": [row(1e-3, 190, 9.0), row(3e-3, 210, 8.0)],
                 "Shampoo": [row(1e-3, 150, 16.0), row(3e-3, 150, 15.0)]}
    best = {"AdamW": summaries["AdamW"][0], "Shampoo": summaries["Shampoo"][1]}
    table = convergence._best_table(char_lm, best, summaries)
    assert table.rows[0][:4] == ["steps to target", 190, 150, pytest.approx(190 / 150)]
    assert table.rows[1][:4] == ["seconds to target", 9.0, 15.0, pytest.approx(0.6)]
    assert "AdamW lr 0.003 (8 s), Shampoo lr 0.003 (15 s); AdamW / Shampoo 0.533" in table.notes[-1]
    summaries["AdamW"][1]["seconds_to_target"] = 10.0
    assert convergence._fastest_note(best, summaries) == []
