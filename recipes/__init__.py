"""Models and data of the recipe YAMLs in this folder (installed as ``lightning_shampoo.recipes``)."""

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
