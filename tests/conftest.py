"""Test-session settings.

One intra-op thread per process: the suite runs multi-process (gloo) tests on a 2-core machine, and
OpenMP teams that outnumber the cores slow small fp64 factorizations down by up to 100x. Set in the
environment too, so spawned worker processes inherit it.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
