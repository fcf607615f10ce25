"""Models and data of the recipe YAMLs in this folder, installed as ``lightning_shampoo.recipes``: import
them from there.

Imported by its folder name instead (``import recipes`` with the repository root on ``sys.path``, as in the
test run), this package hands out the installed module itself, so there is one identity per class.
"""

import sys

if __name__ == "lightning_shampoo.recipes":
    from .data import CharWindows, Digits, ResumableDataLoader, ResumableSampler, StdlibText, stdlib_source
    from .models import CharTransformer, DigitsMLP
    from .schedules import WarmupCosine

    __all__ = [
        "CharTransformer",
        "CharWindows",
        "Digits",
        "DigitsMLP",
        "ResumableDataLoader",
        "ResumableSampler",
        "StdlibText",
        "WarmupCosine",
        "stdlib_source",
    ]
else:  # imported as a top-level package: alias the installed module instead of loading a twin
    import importlib

    sys.modules[__name__] = importlib.import_module("lightning_shampoo.recipes")
