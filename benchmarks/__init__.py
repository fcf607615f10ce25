"""Benchmarks of lightning_shampoo against torch.optim.AdamW and the PyPI peers.

Run ``python -m benchmarks.run`` (``--quick`` for a smoke run, ``--only NAME`` for one figure);
results go to ``benchmarks/results/`` as ``results.md``, ``results.json`` and PNG plots, and the
README's results block is generated from them (``python -m benchmarks.readme``).
"""

import sys

# The console script's rule: idle OpenMP threads sleep (PASSIVE) only where other processes already keep a
# core busy (with spinning, two threads on two cores then stall for milliseconds at every op); on a free
# machine OpenMP's default (spin briefly, then sleep) is faster. It only acts before torch loads OpenMP,
# so a process that already has torch (a test session) is left alone. The policy is recorded with the
# results; set OMP_WAIT_POLICY to choose it.
if "torch" not in sys.modules:
    from lightning_shampoo._cpu import set_wait_policy

    set_wait_policy()
