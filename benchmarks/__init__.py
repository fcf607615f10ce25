"""Benchmarks of lightning_shampoo against torch.optim.AdamW and the PyPI peers.

Run ``python -m benchmarks.run`` (``--quick`` for a smoke run, ``--only NAME`` for one figure);
results go to ``benchmarks/results/`` as ``results.md``, ``results.json`` and PNG plots, and the
README's results block is generated from them (``python -m benchmarks.readme``).
"""

import os
import sys

# Idle OpenMP threads sleep instead of spinning. With spinning, two threads on two cores stall for
# milliseconds whenever another process holds one core (small ops slow down ~50×). It only acts before
# torch loads OpenMP, so a process that already has torch (a test session) is left alone. Set
# OMP_WAIT_POLICY=ACTIVE to measure the spinning default; the policy is recorded with the results.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
