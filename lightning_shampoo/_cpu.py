"""CPU threading of the console script: OpenMP's wait policy, and the cores of training and of Shampoo's
background refresh worker.

Nothing here imports torch at module level: the console script sets the wait policy before torch loads
the OpenMP runtime, which reads it once. A library import never calls these; the console script does
(``lightning_shampoo.__main__``, then :func:`lightning_shampoo.cli.configure_cpu_threads`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

# Idle OpenMP threads sleep instead of spinning. A spinning team stalls whenever another process holds one
# of its cores: on a shared 2-core machine (1-min load 5-12) the char-LM recipe with 2 training threads
# ran 2.2-12.6x slower without it, median 4.2 (1 training thread: no team, no difference).
WAIT_POLICY = "PASSIVE"
# A background refresh worker gets cores of its own (REFRESH_THREADS of them, training the rest) only
# where a training process has at least SPLIT_FROM cores; with fewer, taking one from training costs more
# than sharing (measured on 2 cores: the char-LM recipe's tokens/s 0.94-2.6x, median 1.5x, higher shared
# than split, as in the refresh-hiding benchmark's mean step). From 4 cores on, the split costs training
# at most a quarter of its threads and keeps the worker off training's OpenMP team (a judgment, not
# measured on this 2-core machine).
REFRESH_THREADS = 1
SPLIT_FROM = 4


def set_wait_policy(environ: MutableMapping[str, str] = os.environ) -> str:
    """``OMP_WAIT_POLICY=PASSIVE`` unless already set; returns the policy in force. Acts only if called
    before torch is imported (later, the running OpenMP runtime has already read it)."""
    return environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


@dataclass(frozen=True)
class ThreadPlan:
    """Threads of one training process.

    Attributes:
        training: torch's intra-op threads for training; None: leave torch's count as it is.
        refresh: ``refresh_threads`` for Shampoo's background worker; None: leave it (sharing training's
            threads, unless the optimizer sets it).
    """

    training: int | None
    refresh: int | None


def plan_threads(
    threads: int, processes: int, background_refresh: bool, environ: Mapping[str, str] = os.environ
) -> ThreadPlan:
    """Splits ``threads`` (torch's default count: the cores this process may use) among ``processes``
    training processes on the machine and, for a background refresh on at least :data:`SPLIT_FROM` cores
    per process, between training and :data:`REFRESH_THREADS` for the worker (with fewer, the worker
    shares training's). ``OMP_NUM_THREADS`` in ``environ`` is the user's choice of training threads."""
    per_process = max(1, threads // max(1, processes))
    refresh = REFRESH_THREADS if background_refresh and per_process >= SPLIT_FROM else None
    training = per_process - (refresh or 0)
    if "OMP_NUM_THREADS" in environ or training == threads:
        return ThreadPlan(None, refresh)
    return ThreadPlan(training, refresh)
