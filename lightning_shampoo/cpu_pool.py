"""Refresh work spread over helper threads that each run torch on one intra-op thread.

A refresh is many independent eigendecompositions, and LAPACK's ``eigh`` gains little from threads inside
one matrix: measured on the 2-core machine, the char-LM benchmark's factors (14 of 128, 2 of 256 and 384,
4 of 512, fp32) took 80 ms on one 2-thread team (default wait policy; 590 ms under
``OMP_WAIT_POLICY=PASSIVE``, where each of ``eigh``'s many small parallel regions pays a wake-up), 100 ms
on one thread, and 53 ms as the same single-threaded calls on two helper threads side by side. So a
refresh on ``workers > 1`` CPU threads computes its batches in pieces on ``workers`` helpers, one thread
each. Every matrix then goes through the same single-threaded LAPACK/BLAS calls whatever ``workers`` is,
so the results do not depend on it, bitwise (tested).

Helpers are created once per ``workers`` count and nice value, and kept: idle threads cost nothing; they
are daemon threads, so interpreter exit does not wait for them; a forked child starts without them.
Single-threaded helpers are not OpenMP team threads, so they do not trip libgomp's throttling of
oversubscribed teams (see :mod:`._cpu`). Only torch's OpenMP backend keeps thread counts per thread; on any
other backend, :func:`available` is False and the caller computes inline.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import cache
from typing import TypeVar

import torch

T = TypeVar("T")

_HELPERS: dict[tuple[int, int], _Helpers] = {}
_HELPERS_LOCK = threading.Lock()


def _forget_helpers() -> None:
    """In a forked child (a DataLoader worker): threads do not survive fork, and the lock may have been
    held by a thread that did not either."""
    global _HELPERS_LOCK
    _HELPERS_LOCK = threading.Lock()
    _HELPERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers)


@cache
def available() -> bool:
    """Whether torch keeps intra-op thread counts per thread (its OpenMP backend), which helpers need."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def run_single_threaded(tasks: Sequence[Callable[[], T]], workers: int) -> list[T]:
    """The results of ``tasks``, in order, computed on ``workers`` helper threads of one intra-op thread
    each. Submit the costliest first: helpers take tasks in order. The first task that raises re-raises
    here, after every task has finished."""
    helpers = _helpers(workers)
    futures = [helpers.submit(task) for task in tasks]
    for future in futures:
        future.exception()  # wait for all before raising, so no task outlives the refresh
    return [future.result() for future in futures]


class _Helpers:
    """``workers`` daemon threads taking tasks from one queue. Daemon, unlike ``ThreadPoolExecutor``'s
    threads, which interpreter exit joins: exit must not wait for a refresh (as for the refresh worker)."""

    def __init__(self, workers: int) -> None:
        self._tasks: queue.SimpleQueue[tuple[Future, Callable[[], object]]] = queue.SimpleQueue()
        # torch.set_num_threads in a helper also sets torch's process-wide default, which threads adopt at
        # their first parallel op: the caller's own count is read first and put back once all have started.
        own = torch.get_num_threads()
        started = threading.Barrier(workers + 1)
        for index in range(workers):
            threading.Thread(target=self._serve, args=(started,), name=f"shampoo-refresh-helper-{index}",
                             daemon=True).start()
        started.wait()
        torch.set_num_threads(own)

    def submit(self, task: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._tasks.put((future, task))
        return future

    def _serve(self, started: threading.Barrier) -> None:
        # A thread adopts the process-wide default at its first parallel op or thread-count query,
        # replacing any count set before: query first, so that the 1 set here is what stays.
        torch.get_num_threads()
        torch.set_num_threads(1)
        started.wait()
        while True:
            future, task = self._tasks.get()
            try:
                future.set_result(task())
            except BaseException as exc:  # handed to the caller, which re-raises it
                future.set_exception(exc)


def _helpers(workers: int) -> _Helpers:
    """Helpers for the calling thread: a thread starts with its creator's nice value (Linux), so helpers
    kept per nice value compute at the priority of whoever calls (the niced refresh worker, or training)."""
    key = (workers, _niceness())
    with _HELPERS_LOCK:
        if key not in _HELPERS:
            _HELPERS[key] = _Helpers(workers)
        return _HELPERS[key]


def _niceness() -> int:
    """The calling thread's nice value (per thread on Linux); 0 where the OS has none."""
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):
        return 0
