"""The ``lightning-shampoo`` console script (also ``python -m lightning_shampoo``).

It sets OpenMP's wait policy (:func:`._cpu.set_wait_policy`) before anything imports torch, which is
when the OpenMP runtime reads it: ``import lightning_shampoo`` does not import torch, and the CLI is
imported only afterwards. Then it runs :func:`lightning_shampoo.cli.main`.
"""

from __future__ import annotations

from ._cpu import set_wait_policy


def main() -> None:
    """Entry point of the ``lightning-shampoo`` console script."""
    set_wait_policy()
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
