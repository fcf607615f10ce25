"""Test-session settings.

One intra-op thread per process: the suite runs multi-process (gloo) tests on a 2-core machine, and
OpenMP teams that outnumber the cores slow small fp64 factorizations down by up to 100x. Idle OpenMP
threads sleep (``OMP_WAIT_POLICY=PASSIVE``) instead of spinning: spinning threads of forked ranks starved
each other on a loaded machine (test_strategies took 28 min instead of 2). Both set in the environment
before torch loads the OpenMP runtime, so spawned worker processes inherit them.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
