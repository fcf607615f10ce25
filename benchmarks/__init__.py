"""Benchmarks of lightning_shampoo against torch.optim.AdamW and the PyPI peers.

Run ``python -m benchmarks.run`` (``--quick`` for a smoke run, ``--only NAME`` for one figure);
results go to ``benchmarks/results/`` as ``results.md``, ``results.json`` and PNG plots.
"""
