"""The refresh on several CPU threads: single-threaded helpers, the same bits for any count."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from lightning_shampoo import cpu_pool, requests, triangles
from lightning_shampoo.refresh import _compute

pytestmark = pytest.mark.skipif(not cpu_pool.available(), reason="helpers need torch's OpenMP backend")


def _snapshots() -> list[requests.FactorSnapshot]:
    """Roots, packed roots and warm-started bases of factors from 64 to 720 wide (MKL's eigh rounds by
    thread count from about 700 on)."""
    generator = torch.Generator().manual_seed(0)
    snapshots = []
    for index, (count, side) in enumerate([(5, 64), (3, 192), (1, 720)]):
        g = torch.randn(count, side, 2 * side, generator=generator)
        factors = g @ g.mT / side
        previous = torch.linalg.qr(torch.randn(count, side, side, generator=generator)).Q
        snapshots += [
            requests.FactorSnapshot(index, f"{index}_root", factors, requests.RootRequest(4.0, 1e-6, True)),
            requests.FactorSnapshot(index, f"{index}_packed", triangles.pack(factors),
                                    requests.RootRequest(2.0, 1e-6, True)),
            requests.FactorSnapshot(index, f"{index}_basis", factors, requests.BasisRequest(), previous),
        ]
    return snapshots


def test_a_refresh_gives_the_same_bits_on_any_number_of_threads() -> None:
    snapshots, settings = _snapshots(), requests.RefreshSettings()
    inline = _compute(snapshots, settings, 1)
    for threads in (2, 3, 4):
        spread = _compute(snapshots, settings, threads)
        for snapshot, one, many in zip(snapshots, inline, spread, strict=True):
            for name, value in requests.fields_of(one).items():
                assert torch.equal(value, requests.fields_of(many)[name]), (threads, snapshot.name, name)
    # What is compared was computed: roots of the right shape, accepted.
    assert all(result.accepted.all() for result in inline)
    assert inline[1].root.shape == snapshots[1].matrices.shape  # packed in, packed out


def test_helpers_compute_on_one_thread_each_and_keep_their_order() -> None:
    def where(delay: float) -> tuple[str, int]:
        time.sleep(delay)
        return threading.current_thread().name, torch.get_num_threads()

    seen = cpu_pool.run_single_threaded([lambda d=d: where(d) for d in (0.05, 0.0, 0.02)], 2)
    assert [count for _, count in seen] == [1, 1, 1]
    assert all(name.startswith("shampoo-refresh") for name, _ in seen)


def test_a_failing_task_is_reraised_once_every_task_has_finished() -> None:
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.1)
        finished.set()

    def failing() -> None:
        raise ValueError("factor exploded")

    with pytest.raises(ValueError, match="factor exploded"):
        cpu_pool.run_single_threaded([failing, slow], 2)
    assert finished.is_set()


def test_helpers_leave_the_callers_count_and_the_process_default_alone() -> None:
    """A helper's set_num_threads(1) also sets torch's process-wide default (what a new thread adopts):
    starting helpers must put it back. In a fresh process, which must also exit promptly with helpers idle."""
    code = textwrap.dedent(
        """
        import threading, torch
        from lightning_shampoo import cpu_pool
        torch.set_num_threads(2)
        helpers = cpu_pool.run_single_threaded([torch.get_num_threads] * 3, 3)
        fresh = []
        thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        thread.start(); thread.join()
        print(helpers, torch.get_num_threads(), fresh)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[1, 1, 1] 2 [2]"


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="nice values per thread are Linux's")
def test_helpers_compute_at_the_callers_priority() -> None:
    """The background refresh worker is niced below training; the helpers it uses must be too, and those
    training uses must not be."""
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen = {}

    def niced_caller() -> None:
        own = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, own, min(19, os.getpriority(os.PRIO_PROCESS, own) + 5))
        seen["caller"] = niceness()
        seen["helpers"] = set(cpu_pool.run_single_threaded([niceness] * 4, 2))

    caller = threading.Thread(target=niced_caller)
    caller.start()
    caller.join()
    assert seen["helpers"] == {seen["caller"]}
    assert set(cpu_pool.run_single_threaded([niceness] * 4, 2)) == {niceness()} != {seen["caller"]}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_starts_helpers_of_its_own() -> None:
    cpu_pool.run_single_threaded([torch.get_num_threads] * 2, 2)  # the parent's helpers exist
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            counts = cpu_pool.run_single_threaded([torch.get_num_threads] * 2, 2)
            os.write(write, repr(counts).encode())
        finally:
            os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 60)  # a child waiting on its parent's helpers never writes
    if not ready:
        os.kill(child, signal.SIGKILL)
    _, status = os.waitpid(child, 0)
    with os.fdopen(read) as pipe:
        assert ready and pipe.read() == "[1, 1]"
    assert os.waitstatus_to_exitcode(status) == 0
