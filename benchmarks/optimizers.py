"""The optimizer configurations the figures compare, each a label plus a factory.

A configuration that cannot run here (a peer library not installed) carries the reason instead of a
factory, so the tables can say so. Measuring a new Shampoo mode (e.g. asynchronous refresh) is one
more :class:`OptimizerSpec` from :func:`shampoo`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_shampoo import Shampoo

Factory = Callable[[Iterable[Tensor]], Optimizer]

# PyPI peers of the optional `bench` extra: (module, class). Never a runtime dependency.
PEERS: tuple[tuple[str, str], ...] = (
    ("pytorch_optimizer", "Shampoo"),
    ("pytorch_optimizer", "ScalableShampoo"),
    ("pytorch_optimizer", "SOAP"),
    ("heavyball", "ForeachSOAP"),
)


@dataclass(frozen=True)
class OptimizerSpec:
    """A labelled optimizer configuration; no ``factory`` when it cannot run (``unavailable`` says why)."""

    label: str
    factory: Factory | None
    unavailable: str = ""
    kind: str = "other"
    options: dict[str, Any] = field(default_factory=dict)
    steady_after: int = 0  # steps before the optimizer runs as it will from then on (first root installed)


def adamw(lr: float = 1e-3, weight_decay: float = 0.0) -> OptimizerSpec:
    return OptimizerSpec(
        "AdamW",
        lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
        kind="adamw",
        options={"lr": lr, "weight_decay": weight_decay},
    )


def refresh_modes() -> tuple[str, ...]:
    """Refresh modes the installed Shampoo offers (``refresh=`` option); ``sync`` is the default."""
    option = inspect.signature(Shampoo).parameters.get("refresh")
    return ("sync",) if option is None else ("sync", "async")


def shampoo(
    precondition_frequency: int, lr: float = 1e-3, refresh: str = "sync", **options: Any
) -> OptimizerSpec:
    """lightning_shampoo at its defaults except ``precondition_frequency``, ``lr`` and ``options``."""
    kwargs = {"lr": lr, "precondition_frequency": precondition_frequency, **options}
    if refresh != "sync":
        kwargs["refresh"] = refresh
    defaults = inspect.signature(Shampoo).parameters
    start = kwargs.get("start_preconditioning_step", defaults["start_preconditioning_step"].default)
    lag = kwargs.get("refresh_lag")
    if lag is None:  # Shampoo's default: installed at once when sync, one refresh period later otherwise
        lag = 0 if refresh == "sync" else precondition_frequency
    suffix = "" if refresh == "sync" else f" {refresh}"
    return OptimizerSpec(
        f"Shampoo f{precondition_frequency}{suffix}",
        lambda params: Shampoo(params, **kwargs),
        kind="shampoo",
        options=kwargs,
        steady_after=start + lag,
    )


def peers(precondition_frequency: int, lr: float = 1e-3, block_size: int = 1024) -> list[OptimizerSpec]:
    """The PyPI peers at settings matched to :func:`shampoo`: same lr, refresh frequency and block size.

    Each peer names these settings differently; only the names its constructor takes are passed.
    """
    matched = {
        "lr": lr,
        "weight_decay": 0.0,
        "precondition_frequency": precondition_frequency,
        "preconditioning_compute_steps": precondition_frequency,
        "start_preconditioning_step": 10,
        "update_freq": precondition_frequency,
        "block_size": block_size,
        "max_precond_dim": block_size,
    }
    specs = []
    for module_name, class_name in PEERS:
        label = f"{module_name}.{class_name} f{precondition_frequency}"
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except ImportError:
            specs.append(OptimizerSpec(label, None, unavailable="not installed", kind="peer"))
            continue
        except AttributeError:
            specs.append(OptimizerSpec(label, None, unavailable="not in the installed version", kind="peer"))
            continue
        accepted = inspect.signature(cls).parameters
        kwargs = {name: value for name, value in matched.items() if name in accepted}
        specs.append(
            OptimizerSpec(label, lambda params, cls=cls, kwargs=kwargs: cls(params, **kwargs), kind="peer",
                          options=kwargs)
        )
    return specs


def close(optimizer: Optimizer) -> None:
    """Release an optimizer's background resources (Shampoo's refresh engine), if it has any."""
    closer = getattr(optimizer, "close", None)
    if callable(closer):
        closer()
