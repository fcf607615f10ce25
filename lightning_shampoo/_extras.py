"""Optional dependencies: checked before they are needed, with an error naming what installs them."""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

INSTALL_RECIPES = "pip install 'lightning-shampoo[recipes]'"


class Requirement(NamedTuple):
    """An optional dependency: the ``module`` imported, the ``package`` installing it, what needs it."""

    module: str
    package: str
    purpose: str


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed; the message says how to install it."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package of a dotted name
        return False


def check_requirements(cls: type) -> None:
    """Raises :class:`MissingExtra` for the first of ``cls.requires`` (``Requirement`` entries, e.g. of a
    recipe's data module) that is not installed (the plain ``pip install lightning-shampoo`` leaves
    them out)."""
    for requirement in getattr(cls, "requires", ()):
        if not installed(requirement.module):
            raise MissingExtra(
                f"{requirement.purpose} needs {requirement.package}, which the plain install leaves out: "
                f"{INSTALL_RECIPES} (or pip install {requirement.package})",
                name=requirement.module,
            )
