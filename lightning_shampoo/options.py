"""Shampoo's options: the per-group defaults and the optimizer-wide records, each validated in one place.

Users pass flat keyword arguments (``Shampoo(params, lr=…, refresh="async", …)``); the options that
interlock are gathered here into small frozen records, validated together, with messages that say what
to pass instead.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import grafting
from .eigen import EIGH_DTYPES
from .layout import DISTRIBUTE_MODES
from .policies import EveryNSteps, FunctionPolicy, RefreshPolicy
from .refresh import MODES

PRECONDITIONERS = ("root_inverse", "eigenvalue_corrected")
FACTOR_DTYPES = (torch.float32, torch.bfloat16)
INVERSE_ROOTS = ("eigh", "newton")
# Options that decide the state's layout: a checkpoint only loads into an optimizer that agrees on them.
STRUCTURAL_OPTIONS = ("block_size", "max_preconditioned_dim", "precondition_1d", "max_factor_ratio")


# Shampoo's keyword arguments by where they go: the per-group defaults, the step's record, the refresh's.
GROUP_OPTIONS = (
    "lr", "betas", "epsilon", "weight_decay", "block_size", "graft", "graft_beta2", "graft_epsilon",
    "exponent_override", "exponent_multiplier", "pseudo_inverse", "relative_epsilon",
    "max_preconditioned_dim", "precondition_1d", "max_factor_ratio",
)  # fmt: skip
REFRESH_ARGUMENTS = (
    "refresh", "refresh_lag", "refresh_policy", "refresh_threads", "precondition_frequency",
    "start_preconditioning_step",
)  # fmt: skip
SEPARATE_ARGUMENTS = ("process_group",)  # kept by the optimizer itself


def parse_arguments(arguments: dict[str, Any]) -> tuple[dict[str, Any], StepOptions, RefreshOptions]:
    """Shampoo's flat keyword arguments → the per-group defaults, the step's and the refresh's records,
    each validated. Every argument goes to exactly one of them (or is one the optimizer keeps)."""
    step_fields = [field.name for field in dataclasses.fields(StepOptions)]
    known = {*GROUP_OPTIONS, *REFRESH_ARGUMENTS, *step_fields, *SEPARATE_ARGUMENTS}
    if set(arguments) != known:
        raise TypeError(f"Shampoo arguments and their records disagree: {sorted(set(arguments) ^ known)}")
    defaults = {name: arguments[name] for name in GROUP_OPTIONS}
    validate_group(defaults)
    step = StepOptions(**{name: arguments[name] for name in step_fields})
    refresh = RefreshOptions.from_arguments(*(arguments[name] for name in REFRESH_ARGUMENTS))
    if step.preconditioner == "root_inverse" and step.matmul_dtype == torch.bfloat16:
        warnings.warn(BFLOAT16_ROOT_PRODUCTS, UserWarning, stacklevel=3)  # at the user's Shampoo(...) line
    return defaults, step, refresh


# R·M with a root R cancels terms up to R's eigenvalue spread larger than the result; bfloat16 products
# lose it (bfloat16 storage of R, multiplied in float32, does not). Measured in tests/test_convergence.py.
BFLOAT16_ROOT_PRODUCTS = (
    "Shampoo(matmul_dtype=torch.bfloat16) multiplies by the inverse roots in bfloat16, which loses the "
    "directions a root scales down most (its products cancel terms up to its eigenvalue spread larger than "
    "the result): on a 64-128-10 MLP the final loss was 2.8-4.5x that of float32 products. Leave "
    "matmul_dtype=None (float32 products; factor_dtype=torch.bfloat16 still halves the memory), or use "
    "preconditioner='eigenvalue_corrected', whose bfloat16 products cost nothing there."
)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def validate_group(group: dict[str, Any], inverse_root: str = "eigh") -> None:
    """Check the options of one parameter group (the defaults, or a group's own values)."""
    beta1, beta2 = group["betas"]
    require(group["lr"] >= 0, f"lr must be >= 0, got {group['lr']}")
    require(0 <= beta1 < 1, f"betas[0] must be in [0, 1), got {beta1}")
    require(0 < beta2 <= 1, f"betas[1] must be in (0, 1] (1 = running sum), got {beta2}")
    require(group["epsilon"] >= 0, f"epsilon must be >= 0, got {group['epsilon']}")
    require(group["weight_decay"] >= 0, f"weight_decay must be >= 0, got {group['weight_decay']}")
    require(group["block_size"] >= 1, f"block_size must be >= 1, got {group['block_size']}")
    require(
        group["graft"] in grafting.GRAFTS, f"graft must be one of {grafting.GRAFTS}, got {group['graft']!r}"
    )
    require(0 < group["graft_beta2"] <= 1, f"graft_beta2 must be in (0, 1], got {group['graft_beta2']}")
    require(group["graft_epsilon"] >= 0, f"graft_epsilon must be >= 0, got {group['graft_epsilon']}")
    override = group["exponent_override"]
    require(override is None or override >= 1, f"exponent_override must be None or >= 1, got {override}")
    multiplier = group["exponent_multiplier"]
    require(multiplier > 0, f"exponent_multiplier must be > 0 (1: the classic −1/(2k)), got {multiplier}")
    require(
        override is None or multiplier == 1,
        "exponent_override fixes the root order p; combine it with exponent_multiplier=1 only "
        f"(got exponent_multiplier={multiplier})",
    )
    limit = group["max_preconditioned_dim"]
    require(limit is None or limit >= 1, f"max_preconditioned_dim must be None or >= 1, got {limit}")
    ratio = group["max_factor_ratio"]
    require(ratio is None or ratio > 0, f"max_factor_ratio must be None or > 0, got {ratio}")
    require(
        not (group["pseudo_inverse"] and inverse_root == "newton"),
        "pseudo_inverse needs inverse_root='eigh' (the coupled Newton iteration has no pseudo-inverse)",
    )


def root_exponent(group: dict[str, Any], order: int) -> float:
    """The root order p of a block with ``order`` preconditioned dims: ``P = (S + εI)^(−1/p)``.

    ``exponent_override``, else ``2k / exponent_multiplier`` (multiplier 1: the classic −1/(2k)).
    """
    if group["exponent_override"] is not None:
        return group["exponent_override"]
    p = 2 * order / group["exponent_multiplier"]
    return int(p) if float(p).is_integer() else p


@dataclass(frozen=True)
class RefreshOptions:
    """When preconditioners are refreshed, where the work runs and when results are installed
    (``Shampoo(...).refresh_options``; built by :meth:`from_arguments` from the flat keyword arguments).

    Attributes:
        mode: ``"sync"``, ``"async"`` or ``"best_effort"`` (the ``refresh`` option).
        lag: steps from a snapshot to the install of its results (the bound on it for best effort).
        policy: the schedule given at construction (``Shampoo.policy`` is the one in force).
        threads: CPU threads of the refresh computation (``None``: torch's count; see :mod:`.cpu_pool`).
        frequency, start: ``precondition_frequency`` and ``start_preconditioning_step``.
    """

    mode: str
    lag: int
    policy: RefreshPolicy
    threads: int | None
    frequency: int
    start: int

    @classmethod
    def from_arguments(
        cls,
        refresh: str,
        refresh_lag: int | None,
        refresh_policy: RefreshPolicy | Callable[[int], bool] | None,
        refresh_threads: int | None,
        precondition_frequency: int,
        start_preconditioning_step: int,
    ) -> RefreshOptions:
        require(
            precondition_frequency >= 1, f"precondition_frequency must be >= 1, got {precondition_frequency}"
        )
        require(
            start_preconditioning_step >= 1,
            f"start_preconditioning_step must be >= 1 (steps count from 1), got {start_preconditioning_step}",
        )
        require(refresh in MODES, f"refresh must be one of {MODES}, got {refresh!r}")
        if refresh_lag is None:
            refresh_lag = 0 if refresh == "sync" else precondition_frequency
        require(refresh_lag >= 0, f"refresh_lag must be >= 0, got {refresh_lag}")
        require(
            refresh_threads is None or refresh_threads >= 1,
            f"refresh_threads must be None or >= 1, got {refresh_threads}",
        )
        if refresh_policy is None:
            refresh_policy = EveryNSteps(start_preconditioning_step, precondition_frequency)
        elif not isinstance(refresh_policy, RefreshPolicy):
            require(
                callable(refresh_policy),
                f"refresh_policy must be a RefreshPolicy or a function step -> bool, got {refresh_policy!r}",
            )
            refresh_policy = FunctionPolicy(refresh_policy)
        return cls(
            refresh,
            refresh_lag,
            refresh_policy,
            refresh_threads,
            precondition_frequency,
            start_preconditioning_step,
        )


@dataclass(frozen=True)
class StepOptions:
    """Optimizer-wide options of the step itself (as opposed to a group's hyperparameters)."""

    preconditioner: str
    inverse_root: str
    max_root_residual: float
    statistics_frequency: int
    check_finite: bool
    distribute: str
    eigh_dtype: torch.dtype | None = None
    basis_tolerance: float = 0.01
    factor_dtype: torch.dtype = torch.float32
    matmul_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        require(
            self.preconditioner in PRECONDITIONERS,
            f"preconditioner must be one of {PRECONDITIONERS}, got {self.preconditioner!r}",
        )
        require(
            self.inverse_root in INVERSE_ROOTS,
            f"inverse_root must be one of {INVERSE_ROOTS}, got {self.inverse_root!r}",
        )
        require(self.max_root_residual > 0, f"max_root_residual must be > 0, got {self.max_root_residual}")
        require(
            self.statistics_frequency >= 1,
            f"statistics_frequency must be >= 1, got {self.statistics_frequency}",
        )
        require(
            self.distribute in DISTRIBUTE_MODES,
            f"distribute must be one of {DISTRIBUTE_MODES}, got {self.distribute!r}",
        )
        require(
            self.eigh_dtype is None or self.eigh_dtype in EIGH_DTYPES,
            f"eigh_dtype must be None or one of {EIGH_DTYPES}, got {self.eigh_dtype}",
        )
        require(
            self.factor_dtype in FACTOR_DTYPES,
            f"factor_dtype must be one of {FACTOR_DTYPES}, got {self.factor_dtype}",
        )
        require(
            self.matmul_dtype in (None, *FACTOR_DTYPES),
            f"matmul_dtype must be None or one of {FACTOR_DTYPES}, got {self.matmul_dtype}",
        )
        require(
            0 <= self.basis_tolerance < 1,
            f"basis_tolerance must be in [0, 1) (0: a full eigendecomposition every refresh), got "
            f"{self.basis_tolerance}",
        )
