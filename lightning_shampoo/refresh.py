"""Preconditioner refresh: snapshot → compute → install, inline or on a background worker.

At a refresh step (decided by a :class:`RefreshPolicy`) the optimizer hands the engine a
:class:`FactorSnapshot` of every factor, with a request saying what to compute from it: an inverse root
``(S + εI)^(−1/p)`` (:class:`RootRequest`) or an eigenbasis (:class:`BasisRequest`). The engine computes
them with :func:`compute_refresh` (batched by size and request) and hands the results back for install
at a later step boundary. The modes differ only in *where* the work runs and *when* results are installed:

- ``"sync"``: inside ``step()``; installed at ``t + lag`` (``lag = 0``: the classic behaviour).
- ``"async"``: on a background thread; installed at exactly ``t + lag``, the step waiting for them if
  they are late. Same snapshot, same function, same thread count → bitwise the trajectory of ``"sync"``
  with the same lag.
- ``"best_effort"``: on the background thread; installed at the first step boundary after ``t`` at which
  they are ready, and at the latest at ``t + lag`` (``lag`` is the staleness bound; the step waits then).
  The install step depends on timing, so the trajectory is not reproducible.

The optimizer submits a parameter's first refresh with lag 0 in every mode (it has nothing to install
before it, and training on the graft alone at the preconditioner's learning rate is what a lag would
cost; see ``Shampoo._submit``), so its tickets may pass a waiting one.

A computation that raises is never installed, in any mode: the next ``step()`` re-raises it before it
changes anything, so every step happens whole or not at all.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import cpu_pool
from ._cpu import background_refresh_threads
from .guards import caller_stacklevel
from .policies import EveryNSteps, FunctionPolicy, OnRequest, RefreshPolicy
from .requests import (
    FactorSnapshot,
    RefreshSettings,
    Result,
    compute_refresh,
    fields_of,
    result_from_dict,
    result_to_dict,
    snapshot_from_dict,
    snapshot_to_dict,
)

__all__ = ["MODES", "EveryNSteps", "FunctionPolicy", "OnRequest", "RefreshEngine", "RefreshPolicy"]

MODES = ("sync", "async", "best_effort")
# Added to the refresh worker's nice value (Linux): see _lower_priority.
WORKER_NICENESS = 10
# A background refresh that keeps training waiting is reported once: after LATE_WAITS waits, once they
# add up to LATE_SECONDS and to LATE_SHARE of the time since the first refresh was submitted.
LATE_WAITS, LATE_SECONDS, LATE_SHARE = 3, 0.5, 0.1


# ---------------------------------------------------------------------------------------- threads


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the body with ``count`` intra-op threads in the calling thread, then restore its count.

    What ``torch.set_num_threads`` does on the OpenMP backend of the torch CPU builds (checked on torch
    2.13, MKL): it sets the *calling* thread's OpenMP and MKL thread counts, plus a process-wide default
    that a thread adopts when it first runs a parallel op. A thread that has already run one (the
    training thread, from its first step on) keeps its own count, so calling it from the refresh worker
    does not throttle training. The default is restored on exit; a thread whose first parallel op falls
    inside the body starts with ``count`` threads (DataLoader worker and pin-memory threads set their own).

    The count matters for bits: MKL's ``eigh`` rounds differently with 1 and 2 threads for ``d ≳ 700``.
    On torch's OpenMP backend a refresh computes inline on one thread or on single-threaded helpers
    (:func:`_compute`), so every matrix is decomposed on one thread whatever the count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _compute(snapshots: list[FactorSnapshot], settings: RefreshSettings, threads: int | None) -> list[Result]:
    """On ``threads`` CPU threads (``None``: the calling thread's count): one inline, more as
    single-threaded helpers (:mod:`.cpu_pool`), so the bits do not depend on the count."""
    if not cpu_pool.available():
        if threads is None:
            return compute_refresh(snapshots, settings)
        with intra_op_threads(threads):
            return compute_refresh(snapshots, settings)
    workers = threads or torch.get_num_threads()
    if workers > 1:
        return compute_refresh(snapshots, settings, workers)
    with intra_op_threads(1):
        return compute_refresh(snapshots, settings)


# ---------------------------------------------------------------------------------------- engine


@dataclass(eq=False)
class _Ticket:
    """One refresh: the snapshots taken at ``step``, their results once computed, and timings."""

    step: int
    install_step: int
    snapshots: list[FactorSnapshot]
    results: list[Result] | None = None
    error: BaseException | None = None
    submitted: float = field(default_factory=time.perf_counter)
    finished: float = 0.0
    # CUDA events after the device-to-host snapshot copies; the worker waits on them before reading.
    copies: list[Any] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def compute(self, settings: RefreshSettings, threads: int | None) -> None:
        """Compute the results; a failure is kept in ``error`` (the training thread re-raises it)."""
        try:
            for event in self.copies:
                event.synchronize()
            results = _compute(self.snapshots, settings, threads)
            if self.copies:
                # Pinned host memory, so the install's host-to-device copies can be non-blocking.
                results = [type(r)(*(v.pin_memory() for v in fields_of(r).values())) for r in results]
            self.results = results
        except Exception as error:
            self.error = error
        finally:
            self.finished = time.perf_counter()
            self.done.set()


def _serve(
    inbox: queue.SimpleQueue, stop: threading.Event, settings: RefreshSettings, threads: int | None
) -> None:
    """The worker loop; holds no reference to the engine, so a dropped optimizer can be collected."""
    _lower_priority()
    while True:
        ticket = inbox.get()
        if ticket is None or stop.is_set():
            return
        ticket.compute(settings, threads)


def _lower_priority() -> None:
    """Nice the calling thread by ``WORKER_NICENESS`` (Linux: the nice value is per thread, and the
    OpenMP/MKL threads it starts inherit it).

    Where cores are short (CPU training on all of them, a busy data loader), the scheduler then gives
    them to training and the refresh takes the leftover cycles (once measured on a loaded 2-core machine,
    an un-niced refresh doubled the forward/backward time of the steps it overlapped; with a core free
    for the worker, niced and un-niced runs time alike). The price is a slower refresh where cores are
    short, which the lag (or a wait at ``t + lag``) absorbs.
    """
    if sys.platform.startswith("linux"):
        thread = threading.get_native_id()
        # A sandbox refusing it costs only the priority, never the refresh.
        with suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + WORKER_NICENESS)


def _shutdown(
    inbox: queue.SimpleQueue, stop: threading.Event, thread: threading.Thread, wait: bool | None
) -> None:
    """Stop the worker: queued tickets are skipped, the one being computed finishes, then the thread ends.

    ``wait=None`` (garbage collection, interpreter exit): wait for that refresh, except when the process is
    ending on Ctrl-C (an uncaught ``KeyboardInterrupt``), where the daemon thread is left behind at once.
    """
    stop.set()
    inbox.put(None)
    if wait is None:
        wait = getattr(sys, "last_type", None) is not KeyboardInterrupt
    if wait and thread is not threading.current_thread():
        thread.join()


class _Worker:
    """A background thread computing tickets in submission order.

    It is a daemon thread stopped by :meth:`close` or by a ``weakref.finalize`` when the engine is
    garbage-collected or at interpreter exit; exit on Ctrl-C never waits for it (:func:`_shutdown`).
    """

    def __init__(self, settings: RefreshSettings, threads: int | None) -> None:
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_serve,
            args=(self._inbox, self._stop, settings, threads),
            name="shampoo-refresh",
            daemon=True,
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._inbox, self._stop, self._thread, None)

    def put(self, ticket: _Ticket) -> None:
        self._inbox.put(ticket)

    def close(self, wait: bool) -> None:
        """Stop the thread; ``wait``: until the refresh it is computing is done."""
        if self._finalizer.detach() is not None:
            _shutdown(self._inbox, self._stop, self._thread, wait)


class RefreshEngine:
    """Computes the results of submitted snapshots and says which to install at each step.

    Args:
        settings: how roots and bases are computed.
        mode: ``"sync"``, ``"async"`` or ``"best_effort"`` (see the module docstring).
        lag: steps between a snapshot and the install of its roots (the bound on it for best-effort).
        threads: CPU threads of the computation in every mode (single-threaded helpers when more than one,
            :func:`_compute`); ``None``: in sync mode the training thread's count; for the worker, the
            cores CPU training leaves (at least one), or torch's count next to GPU training.

    ``close()`` stops the worker and keeps the pending refreshes; a later step restarts the worker,
    which recomputes the unfinished ones, so the trajectory does not change.
    """

    def __init__(
        self,
        settings: RefreshSettings | None = None,
        mode: str = "sync",
        lag: int = 0,
        threads: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"refresh mode must be one of {MODES}, got {mode!r}")
        self.settings = settings or RefreshSettings()
        self.mode = mode
        self.lag = lag
        self.threads = threads
        self._pending: deque[_Ticket] = deque()
        self._worker: _Worker | None = None
        self._copy_devices: set[torch.device] = set()
        self._installs = 0
        self._latency_last = self._latency_sum = 0.0
        self._staleness_last = self._staleness_sum = 0
        self._wait_s = 0.0
        self._late_waits = 0
        self._warned_late = False
        self._first_submit: float | None = None

    # ------------------------------------------------------------------ training-thread API

    def capture(self, factor: Tensor) -> Tensor:
        """A copy of ``factor`` that later steps cannot change, in host memory for the background modes.

        From CUDA the copy goes non-blocking into pinned memory; :meth:`submit` records the event the
        worker waits on.
        """
        if self.mode == "sync" or factor.device.type == "cpu":
            return factor.detach().clone()
        if factor.device.type != "cuda":
            return factor.detach().cpu()
        host = torch.empty(factor.shape, dtype=factor.dtype, pin_memory=True)
        host.copy_(factor, non_blocking=True)
        self._copy_devices.add(factor.device)
        return host

    def submit(self, step: int, snapshots: list[FactorSnapshot], lag: int | None = None) -> None:
        """Start computing the results of the snapshots taken at ``step``, to install ``lag`` steps later
        (default: the engine's)."""
        ticket = _Ticket(step, step + (self.lag if lag is None else lag), snapshots)
        if self._first_submit is None:
            self._first_submit = ticket.submitted
        ticket.copies = [torch.cuda.current_stream(device).record_event() for device in self._copy_devices]
        self._copy_devices.clear()
        if self.mode == "sync":
            self._compute_now([ticket])
            self._pending.append(ticket)
        else:
            self._pending.append(ticket)
            self._queue([ticket])

    def due(self, step: int) -> list[tuple[FactorSnapshot, Result]]:
        """Results to install at ``step``, oldest first; waits for those that must not be later.

        A refresh whose computation failed is not installed; :meth:`raise_if_failed` reports it.
        """
        ready: list[tuple[FactorSnapshot, Result]] = []
        # In submission order. A due ticket with a shorter lag (a parameter's first) may pass one that is not
        # due; a best-effort install ahead of time never passes one, so a factor's results keep their order.
        passed = False
        for ticket in list(self._pending):
            must = step >= ticket.install_step
            early = self.mode == "best_effort" and step > ticket.step and ticket.done.is_set() and not passed
            if not must and not early:
                passed = True
                continue
            if not ticket.done.is_set():
                self._wait(ticket)
            if ticket.error is not None:
                break
            self._pending.remove(ticket)
            assert ticket.results is not None
            self._installs += 1
            self._latency_last = ticket.finished - ticket.submitted
            self._latency_sum += self._latency_last
            self._staleness_last = step - ticket.step
            self._staleness_sum += self._staleness_last
            ready.extend(zip(ticket.snapshots, ticket.results, strict=True))
        return ready

    def raise_if_failed(self) -> None:
        """Re-raise, once, the first failed computation (its refresh is dropped, nothing was installed)."""
        for ticket in self._pending:
            if ticket.done.is_set() and ticket.error is not None:
                self._pending.remove(ticket)
                raise RuntimeError(
                    f"Shampoo: computing the preconditioner refresh snapshotted at step {ticket.step} failed "
                    f"({self.mode} refresh; cause above). That refresh is dropped and the previous roots or "
                    "bases stay; stepping again continues the run without it."
                ) from ticket.error

    def drain(self) -> None:
        """Block until every submitted refresh is computed (not installed); re-raise a worker failure."""
        self._queue([])
        for ticket in list(self._pending):
            ticket.done.wait()
        self.raise_if_failed()

    def close(self, wait: bool = True) -> None:
        """Stop the worker (``wait``: until the refresh it is computing is done); idempotent; pending
        refreshes stay."""
        if self._worker is not None:
            self._worker.close(wait)
            self._worker = None

    def metrics(self) -> dict[str, float]:
        """Install-time figures: latency is snapshot → roots ready (s), staleness snapshot → use (steps)."""
        installs = max(self._installs, 1)
        return {
            "installs": float(self._installs),
            "in_flight": float(len(self._pending)),
            "refresh_latency_s": self._latency_last,
            "refresh_latency_mean_s": self._latency_sum / installs,
            "staleness": float(self._staleness_last),
            "staleness_mean": self._staleness_sum / installs,
            "wait_s": self._wait_s,
        }

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Pending refreshes: their snapshots, and their results where computed.

        A resumed run installs the saved results, or recomputes missing ones from the snapshots (the
        same bits under the same thread count); either way it continues like the uninterrupted run.
        """
        pending = []
        for ticket in self._pending:
            for event in ticket.copies:
                event.synchronize()
            item: dict[str, Any] = {
                "step": ticket.step,
                "install_step": ticket.install_step,
                "snapshots": [snapshot_to_dict(s) for s in ticket.snapshots],
            }
            if ticket.done.is_set() and ticket.results is not None:
                item["results"] = [result_to_dict(r) for r in ticket.results]
            pending.append(item)
        return {"pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tickets = []
        for item in state.get("pending", []):
            snapshots = [snapshot_from_dict(s) for s in item["snapshots"]]
            if self.mode != "sync":
                snapshots = [_on_host(s) for s in snapshots]
            ticket = _Ticket(item["step"], item["install_step"], snapshots)
            if "results" in item:
                ticket.results = [result_from_dict(r) for r in item["results"]]
                ticket.finished = ticket.submitted
                ticket.done.set()
            tickets.append(ticket)
        unfinished = [t for t in tickets if not t.done.is_set()]
        if self.mode == "sync":
            self._compute_now(unfinished)
        self._pending = deque(tickets)
        if self.mode != "sync":
            self._queue(unfinished)

    # ------------------------------------------------------------------ internals

    def _compute_now(self, tickets: list[_Ticket]) -> None:
        """Sync mode: compute in the training thread, which counts as waiting."""
        start = time.perf_counter()
        for ticket in tickets:
            ticket.compute(self.settings, self.threads)
        self._wait_s += time.perf_counter() - start

    def _queue(self, tickets: list[_Ticket]) -> None:
        """Hand ``tickets`` to the worker; a (re)started worker takes every unfinished pending ticket."""
        if self._worker is None:
            tickets = [t for t in self._pending if not t.done.is_set()]
            if not tickets:
                return
            self._worker = _Worker(self.settings, self._worker_threads())
        for ticket in tickets:
            self._worker.put(ticket)

    def _worker_threads(self) -> int | None:
        """``threads`` if set; else, next to CPU training, the cores training leaves, at least one
        (:func:`._cpu.background_refresh_threads`); next to GPU training (snapshots copied from CUDA),
        torch's count."""
        if self.threads is not None or self._copy_devices:
            return self.threads
        return background_refresh_threads(torch.get_num_threads())

    def _wait(self, ticket: _Ticket) -> None:
        self._queue([])
        start = time.perf_counter()
        ticket.done.wait()
        self._wait_s += time.perf_counter() - start
        if self.lag > 0:  # with lag 0 waiting is what was asked for
            self._warn_if_late()

    def _warn_if_late(self) -> None:
        """Warn once when background refreshes keep training waiting (see :data:`LATE_SHARE`)."""
        self._late_waits += 1
        elapsed = time.perf_counter() - (self._first_submit or 0.0)
        floor = max(LATE_SECONDS, LATE_SHARE * elapsed)
        if self._warned_late or self._late_waits < LATE_WAITS or self._wait_s < floor:
            return
        self._warned_late = True
        warnings.warn(
            f"Shampoo: training waited {self._wait_s:.2f} s of the {elapsed:.1f} s since the first refresh "
            f"for refreshes computed in the background ({self.mode!r}, lag {self.lag}): one takes longer "
            f"than {self.lag} steps. Refresh less often (precondition_frequency), allow a longer lag "
            "(refresh_lag), give the worker more threads (refresh_threads), or use refresh='sync' where the "
            "training device computes a refresh faster (on a GPU: its float64 eigh).",
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
        )


def _on_host(snapshot: FactorSnapshot) -> FactorSnapshot:
    matrices, previous = (t.cpu() if t is not None else None for t in (snapshot.matrices, snapshot.previous))
    return dataclasses.replace(snapshot, matrices=matrices, previous=previous)
