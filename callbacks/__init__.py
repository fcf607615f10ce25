"""Lightning callbacks for Shampoo, installed as ``lightning_shampoo.callbacks``: import them from there.

Imported by its folder name instead (``import callbacks`` with the repository root on ``sys.path``, as in
the test run), this package hands out the installed module itself, so there is one identity per class.
"""

import sys

if __name__ == "lightning_shampoo.callbacks":
    from .shampoo import ShampooCallback

    __all__ = ["ShampooCallback"]
else:  # imported as a top-level package: alias the installed module instead of loading a twin
    import importlib

    sys.modules[__name__] = importlib.import_module("lightning_shampoo.callbacks")
