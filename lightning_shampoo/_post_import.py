"""Run a function right after a module is imported, so optional integrations cost nothing until used.

``import lightning_shampoo`` must stay cheap for plain PyTorch and Accelerate users, yet Lightning users
expect ``Trainer(strategy="shampoo_ddp")`` to work whichever of the two packages they import first. The
strategies are therefore registered when ``lightning.pytorch`` has finished importing: at once if it
already has, else from a one-shot finder on ``sys.meta_path`` that wraps that module's loader.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


def import_after(name: str, module: str) -> None:
    """Import ``module`` once module ``name`` is imported: now if it is, else right after its import.

    A failing import of ``module`` warns instead of breaking the user's import of ``name``.
    """
    if name in sys.modules:
        _import(name, module)
    else:
        sys.meta_path.insert(0, _AfterImport(name, module))


def _import(name: str, module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as error:  # the user's import must not fail because of an optional integration
        warnings.warn(f"lightning_shampoo: importing {module} after {name} failed: {error!r}", stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``name`` with the other finders and makes its loader import ``module`` after executing it."""

    def __init__(self, name: str, module: str) -> None:
        self.name = name
        self.module = module

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the search below from finding this finder
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _import(fullname, self.module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
