"""CPU threading of the console script: OpenMP's wait policy, and the cores of training and of Shampoo's
background refresh worker.

Nothing here imports torch at module level: the console script sets the wait policy before torch loads
the OpenMP runtime, which reads it once. A library import never calls these; the console script does
(``lightning_shampoo.__main__``, then :func:`lightning_shampoo.cli.configure_cpu_threads`). The
exception, :func:`background_refresh_threads`, is how ``Shampoo`` fits its background refresh to the
cores training leaves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

# Where other processes already keep a core busy, idle OpenMP threads sleep instead of spinning: a spinning
# team stalls whenever another process holds one of its cores. Measured on the 2-core machine, the char-LM
# benchmark task's iteration (AdamW / Shampoo, 2 threads): with another process busy on one core, default
# policy 86 / 1397 ms, PASSIVE 51 / 81 ms; on a free machine, default 24 / 42 ms, PASSIVE 40 / 101 ms (each
# small op then pays a wake-up). So PASSIVE only where the machine is busy when training starts.
WAIT_POLICY = "PASSIVE"
BUSY_LOAD = 1.0  # 1-minute load average from which the machine counts as busy (a process on a core)
# libgomp runs every OpenMP team of a process at a throttled spin (idle threads sleep at once, as under
# PASSIVE) as soon as their threads outnumber the cores. A background refresh worker with a team of its
# own next to CPU training on all cores therefore slows both: measured on 2 cores, once the worker had run
# a 2-thread eigh, the training thread's 4×512 eigh took 295 ms instead of 41 and its small ops 1.4× longer;
# the MLP's async iteration at frequency 10 averaged 30.9 ms against 21.8 with a 1-thread worker (sync:
# 20.5), the char-LM's 84.1 against 74.8 (sync: 70.2). So the worker takes only the cores training leaves.
# A background refresh worker gets cores of its own (REFRESH_THREADS of them, training the rest) only
# where a training process has at least SPLIT_FROM cores; with fewer, taking one from training costs more
# than sharing (measured on 2 cores: the char-LM recipe's tokens/s 0.94-2.6x, median 1.5x, higher shared
# than split, as in the refresh-hiding benchmark's mean step). From 4 cores on, the split costs training
# at most a quarter of its threads and keeps the worker off training's OpenMP team (a judgment, not
# measured on this 2-core machine).
REFRESH_THREADS = 1
SPLIT_FROM = 4


def set_wait_policy(environ: MutableMapping[str, str] = os.environ, load: float | None = None) -> str:
    """``OMP_WAIT_POLICY=PASSIVE`` if the machine is busy (1-minute ``load`` average ≥ :data:`BUSY_LOAD`,
    read from the OS by default) and the user set none; returns the policy in force (``"default"``: unset,
    OpenMP spins briefly, then sleeps). Acts only before torch is imported (the OpenMP runtime reads it
    once)."""
    if "OMP_WAIT_POLICY" not in environ and (os.getloadavg()[0] if load is None else load) >= BUSY_LOAD:
        environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return environ.get("OMP_WAIT_POLICY", "default")


def background_refresh_threads(training_threads: int, cpus: int | None = None) -> int:
    """Threads of a background refresh worker next to CPU training with ``training_threads``:
    the cores it leaves (of ``cpus``, by default those this process may use), at least one."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus - training_threads)


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
    per process, between training and :data:`REFRESH_THREADS` for the worker (with fewer, training keeps
    them all and the worker takes what :func:`background_refresh_threads` leaves it). ``OMP_NUM_THREADS``
    in ``environ`` is the user's choice of training threads."""
    per_process = max(1, threads // max(1, processes))
    refresh = REFRESH_THREADS if background_refresh and per_process >= SPLIT_FROM else None
    training = per_process - (refresh or 0)
    if "OMP_NUM_THREADS" in environ or training == threads:
        return ThreadPlan(None, refresh)
    return ThreadPlan(training, refresh)
