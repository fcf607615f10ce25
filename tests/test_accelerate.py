"""Shampoo under a real ``accelerate launch`` on 2 CPU processes (``tests/scripts/accelerate_train.py``):
``save_state`` writes the complete state, ``load_state`` into fresh objects resumes bitwise, and only real
optimizer steps count (gradient accumulation, a step the grad scaler skips)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from dist_utils import assert_checkpoint_is_union_of_shares, free_port

from lightning_shampoo import Shampoo
from lightning_shampoo.accelerate import prepare_shampoo
from lightning_shampoo.statedict import unpack

ROOT = Path(__file__).parent.parent
STEPS, SAVED_AT, ACCUMULATE = 8, 4, 2  # as in the script


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("accelerate")
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate),
        "launch",
        "--config_file",
        str(ROOT / "recipes" / "accelerate_cpu_2proc.yaml"),
        "--main_process_port",
        str(free_port()),
        str(ROOT / "tests" / "scripts" / "accelerate_train.py"),
        str(out),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    subprocess.run(command, env=env, check=True, timeout=180)
    return {
        "ranks": [torch.load(out / f"rank{rank}.pt") for rank in range(2)],
        # What load_state reads: Accelerate loads it weights-only, so this load must work as well.
        "saved": torch.load(out / "state" / "optimizer.bin", weights_only=True),
    }


def test_two_processes_train_together_with_identical_parameters(launched: dict[str, Any]) -> None:
    first, second = launched["ranks"]
    assert first["world_size"] == second["world_size"] == 2
    assert not torch.equal(first["losses_full"][0], second["losses_full"][0])  # each rank its own batches
    for run in ("params_full", "params_resumed"):
        assert torch.equal(first[run], second[run]), run


def test_saving_without_prepare_shampoo_fails_loudly_and_writes_no_partial_state(
    launched: dict[str, Any],
) -> None:
    for rank in launched["ranks"]:
        outcome = rank["unprepared_save"]
        assert "consolidate_state_dict() on every rank" in outcome["error"]
        assert "prepare_shampoo(accelerator, optimizer)" in outcome["error"]
        assert not outcome["optimizer_file_written"]


def test_only_real_optimizer_steps_count(launched: dict[str, Any]) -> None:
    for rank in launched["ranks"]:
        assert len(rank["losses_full"]) == STEPS * ACCUMULATE
        assert rank["steps_full"] == rank["steps_resumed"] == rank["reloaded_steps"] == STEPS
        # (Shampoo's step count, step_was_skipped) for a finite, an infinite, a finite gradient.
        assert rank["scaler_counts"] == [(1.0, False), (1.0, True), (2.0, False)]


def test_save_state_holds_every_parameters_state(launched: dict[str, Any]) -> None:
    saved = launched["saved"]
    assert_checkpoint_is_union_of_shares(saved, [rank["share_saved"] for rank in launched["ranks"]])
    assert unpack(saved)["shampoo"]["engine"]["pending"]  # the refresh in flight at the save travels too


def test_load_state_into_fresh_objects_resumes_bitwise(launched: dict[str, Any]) -> None:
    for rank in launched["ranks"]:
        resumed = rank["losses_resumed"]
        assert len(resumed) == (STEPS - SAVED_AT) * ACCUMULATE
        for full, again in zip(rank["losses_full"][-len(resumed) :], resumed):
            assert torch.equal(full, again)
        assert torch.equal(rank["params_full"], rank["params_resumed"])
        assert rank["held_after_load"] == sorted(rank["share_saved"])  # each rank kept its own part


@pytest.fixture
def accelerator() -> Iterator[Accelerator]:
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_prepare_shampoo_refuses_other_optimizers_and_lone_processes(
    accelerator: Accelerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = [torch.nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(TypeError, match="takes Shampoo optimizers, got SGD"):
        prepare_shampoo(accelerator, torch.optim.SGD(params, lr=0.1))
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched as 2 processes, but Accelerate runs each alone
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU=true"):
        prepare_shampoo(accelerator, Shampoo(params))
