"""The optimizer configurations the figures compare, each a label plus a factory.

A configuration that cannot run here (a peer library not installed) carries the reason instead of a
factory, so the tables can say so. Measuring a new Shampoo mode (e.g. asynchronous refresh) is one
more :class:`OptimizerSpec` from :func:`shampoo`.

The PyPI peers (the optional ``bench`` extra, never a runtime dependency) are listed in :data:`PEERS`,
each with an explicit mapping from our settings to its constructor's arguments and a note on what does
not match (the step-time table prints the notes).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_shampoo import Shampoo

Factory = Callable[[Iterable[Tensor]], Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    """A labelled optimizer configuration; no ``factory`` when it cannot run (``unavailable`` says why)."""

    label: str
    factory: Factory | None
    unavailable: str = ""
    kind: str = "other"
    options: dict[str, Any] = field(default_factory=dict)
    steady_after: int = 0  # first step from which the optimizer runs as it will (a refresh step)
    refresh_period: int = 0  # steps between preconditioner refreshes (0: none)


def adamw(
    lr: float = 1e-3, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)
) -> OptimizerSpec:
    return OptimizerSpec(
        "AdamW",
        lambda params: torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay),
        kind="adamw",
        options={"lr": lr, "weight_decay": weight_decay, "betas": betas},
    )


def refresh_modes() -> tuple[str, ...]:
    """Refresh modes the installed Shampoo offers (``refresh=`` option); ``sync`` is the default."""
    option = inspect.signature(Shampoo).parameters.get("refresh")
    return ("sync",) if option is None else ("sync", "async")


def _shampoo_default(name: str) -> Any:
    return inspect.signature(Shampoo).parameters[name].default


def shampoo(
    precondition_frequency: int | None = None,
    lr: float = 1e-3,
    refresh: str = "sync",
    label: str = "",
    **options: Any,
) -> OptimizerSpec:
    """lightning_shampoo at its defaults except ``precondition_frequency`` (default: Shampoo's), ``lr`` and
    ``options``; ``label`` replaces the default name ``Shampoo f{frequency}``."""
    if precondition_frequency is None:
        precondition_frequency = _shampoo_default("precondition_frequency")
    kwargs = {"lr": lr, "precondition_frequency": precondition_frequency, **options}
    if refresh != "sync":
        kwargs["refresh"] = refresh
    # The first refresh installs at once in every mode (an async step waits for it): steady from the second.
    start = kwargs.get("start_preconditioning_step", _shampoo_default("start_preconditioning_step"))
    suffix = "" if refresh == "sync" else f" {refresh}"
    return OptimizerSpec(
        label or f"Shampoo f{precondition_frequency}{suffix}",
        lambda params: Shampoo(params, **kwargs),
        kind="shampoo",
        options=kwargs,
        steady_after=start + precondition_frequency,
        refresh_period=precondition_frequency,
    )


@dataclass(frozen=True)
class Matched:
    """Our settings a peer is matched to: Shampoo's defaults with the figure's ``lr`` and ``frequency``."""

    lr: float
    frequency: int
    block_size: int = _shampoo_default("block_size")
    start: int = _shampoo_default("start_preconditioning_step")
    epsilon: float = _shampoo_default("epsilon")
    betas: tuple[float, float] = _shampoo_default("betas")
    graft_beta2: float = _shampoo_default("graft_beta2")
    graft_epsilon: float = _shampoo_default("graft_epsilon")


def _po_shampoo(m: Matched) -> dict[str, Any]:
    return {"lr": m.lr, "weight_decay": 0.0, "preconditioning_compute_steps": m.frequency,
            "matrix_eps": m.epsilon}


def _po_scalable_shampoo(m: Matched) -> dict[str, Any]:
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    return {"lr": m.lr, "betas": m.betas, "weight_decay": 0.0, "start_preconditioning_step": m.start,
            "preconditioning_compute_steps": m.frequency, "block_size": m.block_size, "matrix_eps": m.epsilon,
            "graft_type": LayerWiseGrafting.RMSPROP, "diagonal_eps": m.graft_epsilon}


def _po_soap(m: Matched) -> dict[str, Any]:
    return {"lr": m.lr, "betas": (m.betas[0], m.graft_beta2), "shampoo_beta": m.betas[1], "weight_decay": 0.0,
            "precondition_frequency": m.frequency, "max_precondition_dim": m.block_size,
            "precondition_1d": True, "eps": m.graft_epsilon}


def _heavyball_soap(m: Matched) -> dict[str, Any]:
    return {"lr": m.lr, "betas": (m.betas[0], m.graft_beta2), "shampoo_beta": m.betas[1], "weight_decay": 0.0,
            "precondition_frequency": m.frequency, "max_precond_dim": m.block_size, "precondition_1d": True,
            "eps": m.graft_epsilon, "compile_step": False}


def _heavyball_eager(module: ModuleType) -> None:
    # heavyball compiles its fused kernels with inductor on first use unless this global is None; on
    # this CPU that cost 25 s and 16 s of compilation in the first two steps, which a timing run must skip.
    module.utils.compile_mode = None


@dataclass(frozen=True)
class Peer:
    """A PyPI optimizer: ``settings`` maps :class:`Matched` to its arguments, ``notes`` say what differs."""

    module: str
    name: str
    settings: Callable[[Matched], dict[str, Any]]
    notes: str
    setup: Callable[[ModuleType], None] | None = None  # run on the module before the optimizer is built

    @property
    def title(self) -> str:
        return f"{self.module}.{self.name}"


PEERS: tuple[Peer, ...] = (
    Peer("pytorch_optimizer", "Shampoo", _po_shampoo,
         "lr, preconditioning_compute_steps=f, matrix_eps=ε (absolute: factors start at ε·I; ours is "
         "relative to λmax), weight_decay 0. No blocking, grafting, start step or β2 (factors are running "
         "sums); every dim, 1-D included, gets a full factor; roots by SVD every f steps, a zero update "
         "before the first (step f). momentum 0, its default: with 0.9 it diverged on the MLP at lr 1e-3."),
    Peer("pytorch_optimizer", "ScalableShampoo", _po_scalable_shampoo,
         "lr, betas, start_preconditioning_step, preconditioning_compute_steps=f, block_size, matrix_eps=ε "
         "(relative to λmax, like ours), weight_decay 0; graft RMSprop with diagonal_eps=graft ε (it has no "
         "Adam graft). Roots by coupled Schur–Newton (its default; ours: eigh); 1-D parameters graft only "
         "(ours precondition them); nesterov on (its default)."),
    Peer("pytorch_optimizer", "SOAP", _po_soap,
         "lr, betas=(β1, graft β2), shampoo_beta=β2, precondition_frequency=f, max_precondition_dim=block "
         "size, precondition_1d, eps=graft ε, weight_decay 0. Adam in the factors' eigenbasis instead of "
         "grafting; no blocking (a larger dim keeps an identity) and no start step; eigenbasis by QR "
         "power iteration every f steps."),
    Peer("heavyball", "SOAP", _heavyball_soap,
         "Settings as pytorch_optimizer.SOAP (max_precond_dim=block size), compile_step off and "
         "heavyball.utils.compile_mode = None (no torch.compile; its default compiles with inductor, "
         "25 s + 16 s in the first two steps here); merge_dims on (its default).", _heavyball_eager),
    Peer("heavyball", "KLShampoo", _heavyball_soap,
         "heavyball 3.x has no plain Shampoo (nor ForeachSOAP): KL-Shampoo, whose factors' eigenvalues in "
         "the eigenbasis refreshed every f steps are the preconditioner; no grafting. Settings and eager "
         "mode as heavyball.SOAP.", _heavyball_eager),
)


def peer(entry: Peer, precondition_frequency: int, lr: float = 1e-3) -> OptimizerSpec:
    """``entry`` at settings matched to :func:`shampoo` with this lr and frequency."""
    label = f"{entry.title} f{precondition_frequency}"
    try:
        module = importlib.import_module(entry.module)
    except ImportError:
        return OptimizerSpec(label, None, unavailable="not installed", kind="peer")
    except Exception as exc:  # a broken install is a failed peer, not a failed benchmark
        return OptimizerSpec(label, None, unavailable=f"failed: {type(exc).__name__}: {exc}", kind="peer")
    cls = getattr(module, entry.name, None)
    if cls is None:
        return OptimizerSpec(label, None, unavailable="not in the installed version", kind="peer")
    kwargs = entry.settings(Matched(lr, precondition_frequency))

    def build(params: Iterable[Tensor]) -> Optimizer:
        if entry.setup is not None:
            entry.setup(module)
        return cls(params, **kwargs)

    return OptimizerSpec(label, build, kind="peer", options=kwargs,
                         steady_after=_shampoo_default("start_preconditioning_step"),
                         refresh_period=precondition_frequency)


def peers(precondition_frequency: int, lr: float = 1e-3) -> list[OptimizerSpec]:
    """Every entry of :data:`PEERS` at settings matched to :func:`shampoo`'s."""
    return [peer(entry, precondition_frequency, lr) for entry in PEERS]


def close(optimizer: Optimizer) -> None:
    """Release an optimizer's background resources (Shampoo's refresh engine), if it has any."""
    closer = getattr(optimizer, "close", None)
    if callable(closer):
        closer()


def drain(optimizer: Optimizer) -> None:
    """Wait for an optimizer's background refresh work still running (Shampoo's ``drain``), if any."""
    drainer = getattr(optimizer, "drain", None)
    if callable(drainer):
        drainer()
