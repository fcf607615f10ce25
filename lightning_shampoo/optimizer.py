"""The :class:`Shampoo` optimizer: orchestration of blocking, statistics, refresh and grafting."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import grafting
from .blocking import BlockPlan, plan_blocks
from .kronecker import precondition, update_statistics
from .refresh import EveryNSteps, FactorSnapshot, RefreshEngine, RefreshPolicy, RootSettings
from .roots import RootResult

_INVERSE_ROOTS = ("eigh", "newton")


# Options that decide the state's layout: a checkpoint only loads into an optimizer that agrees on them.
_STRUCTURAL_OPTIONS = ("block_size", "max_preconditioned_dim", "precondition_1d")


class _Entry(NamedTuple):
    """A parameter with a gradient this step; ``index`` is its position over all groups."""

    index: int
    group: dict[str, Any]
    position: int
    param: Tensor
    grad: Tensor


class Shampoo(Optimizer):
    r"""Shampoo with grafting, blocking and delayed inverse roots (Anil et al., 2020).

    Per block with gradient ``G`` and Kronecker factors ``S_i`` (one per preconditioned dim):

    .. math::
        S_i ← β_2 S_i + (1−β_2) G_{(i)} G_{(i)}^⊤,\quad P_i = (S_i + ε_i I)^{−1/p},\quad
        D = \hat M ×_1 P_1 ⋯ ×_k P_k,\quad U = D ‖A‖/‖D‖,\quad W ← W(1 − η λ) − η U

    with ``M̂`` the bias-corrected first moment, ``A`` the graft's (diagonal method's) update and
    ``p = exponent_override or 2k``. Roots are refreshed every ``precondition_frequency`` steps from
    ``start_preconditioning_step`` on, in fp64; a root that fails its checks keeps the previous one.
    Until a parameter's first refresh its update is ``A`` alone.

    Args:
        params: parameters or parameter groups (named parameters are used in messages).
        lr: learning rate η.
        betas: ``(β1, β2)``: momentum and the factors' EMA (``β2 = 1``: plain running sum).
        epsilon: ridge ε added before the root; relative to ``λmax(S_i)`` when ``relative_epsilon``.
        weight_decay: decoupled weight decay λ.
        block_size: largest factor dimension; larger dims are split into blocks.
        precondition_frequency: steps between root refreshes.
        start_preconditioning_step: first step whose roots are computed (steps count from 1).
        graft: diagonal method giving the step size: adam, adagrad, rmsprop, sgd or none.
        graft_beta2: β of the graft's second moment (adam, rmsprop).
        graft_epsilon: ε of the graft's denominator.
        exponent_override: root order p for every block instead of 2k.
        relative_epsilon: scale ``epsilon`` by the factor's largest eigenvalue.
        inverse_root: ``"eigh"`` or ``"newton"`` (coupled Newton iteration).
        statistics_frequency: update the factors every this many steps (cheaper steps).
        max_preconditioned_dim: dims larger than this keep an identity factor (e.g. vocabularies).
        precondition_1d: give order-1 parameters (biases, norms) a factor; else graft only.
        max_root_residual: reject a root whose residual check exceeds this.
        refresh_lag: install roots this many steps after their snapshot (0: same step).
        refresh_policy: decides which steps refresh; default every ``precondition_frequency`` steps.
        check_finite: skip parameters with non-finite gradients (one host sync per step).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        epsilon: float = 1e-6,
        weight_decay: float = 0.0,
        block_size: int = 1024,
        precondition_frequency: int = 100,
        start_preconditioning_step: int = 10,
        graft: str = "adam",
        graft_beta2: float = 0.999,
        graft_epsilon: float = 1e-8,
        exponent_override: int | None = None,
        relative_epsilon: bool = True,
        inverse_root: str = "eigh",
        *,
        statistics_frequency: int = 1,
        max_preconditioned_dim: int | None = None,
        precondition_1d: bool = True,
        max_root_residual: float = 0.1,
        refresh_lag: int = 0,
        refresh_policy: RefreshPolicy | None = None,
        check_finite: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            epsilon=epsilon,
            weight_decay=weight_decay,
            block_size=block_size,
            graft=graft,
            graft_beta2=graft_beta2,
            graft_epsilon=graft_epsilon,
            exponent_override=exponent_override,
            relative_epsilon=relative_epsilon,
            max_preconditioned_dim=max_preconditioned_dim,
            precondition_1d=precondition_1d,
        )
        _validate_group(defaults)
        _require(
            precondition_frequency >= 1, f"precondition_frequency must be >= 1, got {precondition_frequency}"
        )
        _require(
            start_preconditioning_step >= 1,
            f"start_preconditioning_step must be >= 1 (steps count from 1), got {start_preconditioning_step}",
        )
        _require(statistics_frequency >= 1, f"statistics_frequency must be >= 1, got {statistics_frequency}")
        _require(
            inverse_root in _INVERSE_ROOTS,
            f"inverse_root must be one of {_INVERSE_ROOTS}, got {inverse_root!r}",
        )
        _require(max_root_residual > 0, f"max_root_residual must be > 0, got {max_root_residual}")
        _require(refresh_lag >= 0, f"refresh_lag must be >= 0, got {refresh_lag}")
        super().__init__(params, defaults)
        for group in self.param_groups:
            _validate_group(group)
        self.statistics_frequency = statistics_frequency
        self.check_finite = check_finite
        self.policy = refresh_policy or EveryNSteps(start_preconditioning_step, precondition_frequency)
        self._engine = RefreshEngine(RootSettings(inverse_root, max_root_residual), lag=refresh_lag)
        self._step = 0
        self._refresh_requested = False
        self._plans: dict[Tensor, BlockPlan] = {}
        self._warned_nonfinite: set[int] = set()
        self._counters = {"nonfinite_skips": 0, "refreshes": 0, "roots_accepted": 0, "roots_rejected": 0}
        self._max_residual = 0.0

    # ------------------------------------------------------------------ public API

    def request_refresh(self) -> None:
        """Refresh every preconditioner at the next step, whatever the policy says."""
        self._refresh_requested = True

    def metrics(self) -> dict[str, float]:
        """Counters for logging: skipped non-finite gradients, refreshes, accepted/rejected roots."""
        out = {name: float(value) for name, value in self._counters.items()}
        out["max_root_residual"] = self._max_residual
        out["step"] = float(self._step)
        return out

    def close(self) -> None:
        """Stop the refresh engine; pending refreshes are dropped."""
        self._engine.close()

    def __enter__(self) -> Shampoo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = self._entries_with_grad()
        if not entries:
            return loss
        self._step += 1
        step = self._step
        finite = self._finite_flags(entries)
        refresh = self._refresh_requested or self.policy.due(step)
        self._refresh_requested = False
        snapshots: list[FactorSnapshot] = []
        for entry, ok in zip(entries, finite, strict=True):
            if ok:
                self._accumulate(entry.group, entry.param, entry.grad, step)
            if refresh:
                snapshots.extend(self._snapshot(entry.index, entry.group, entry.param))
        if snapshots:
            self._counters["refreshes"] += 1
            self._engine.submit(step, snapshots)
        installs = self._engine.due(step)
        if installs:
            params = [param for _, _, param in self._indexed_params()]
            for snapshot, result in installs:
                self._install(params[snapshot.param_index], snapshot, result)
        for entry, ok in zip(entries, finite, strict=True):
            if ok:
                self._apply_update(entry.group, entry.param)
        return loss

    def _entries_with_grad(self) -> list[_Entry]:
        entries = []
        for index, (group, position, param) in enumerate(self._indexed_params()):
            if param.grad is None:
                continue
            grad = param.grad
            if grad.is_sparse:
                raise ValueError(
                    f"Shampoo does not support sparse gradients ({_name(group, position, param)}); "
                    "use dense embeddings (sparse=False) or another optimizer for this parameter."
                )
            if torch.is_complex(param) or torch.is_complex(grad):
                raise TypeError(
                    f"Shampoo does not support complex parameters ({_name(group, position, param)}); "
                    "view them as real with torch.view_as_real."
                )
            if not self.state[param]:
                self._init_state(group, param)
            entries.append(_Entry(index, group, position, param, grad))
        return entries

    def _indexed_params(self) -> Iterable[tuple[dict[str, Any], int, Tensor]]:
        for group in self.param_groups:
            for position, param in enumerate(group["params"]):
                yield group, position, param

    def _finite_flags(self, entries: list[_Entry]) -> list[bool]:
        if not self.check_finite:
            return [True] * len(entries)
        # One fused pass over the gradients (max |g| is non-finite iff some entry is) and one host sync for
        # all parameters, like the AMP grad scaler's found-inf check.
        checked = [entry for entry in entries if entry.grad.numel()]
        flags = {}
        if checked:
            max_abs = torch._foreach_norm([entry.grad for entry in checked], float("inf"))
            device = max_abs[0].device
            finite = torch.stack([m.to(device) for m in max_abs]).isfinite().tolist()
            flags = {entry.index: ok for entry, ok in zip(checked, finite, strict=True)}
        for entry in entries:
            if not flags.get(entry.index, True):
                self._counters["nonfinite_skips"] += 1
                if entry.index not in self._warned_nonfinite:
                    self._warned_nonfinite.add(entry.index)
                    warnings.warn(
                        f"Shampoo: non-finite gradient in {_name(entry.group, entry.position, entry.param)}; "
                        "its update is skipped "
                        "and its statistics are left untouched (further occurrences are only counted in "
                        "metrics()['nonfinite_skips']). Check the loss scale or clip gradients.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return [flags.get(entry.index, True) for entry in entries]

    # ------------------------------------------------------------------ phases

    def _init_state(self, group: dict[str, Any], param: Tensor) -> None:
        plan = self._plan(group, param)
        state = self.state[param]
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.contiguous_format)
        if grafting.has_second_moment(group["graft"]):
            state["graft_sq"] = torch.zeros_like(state["exp_avg"])
        for name, shape in _factor_shapes(plan):
            n, d, _ = shape
            state[f"factor_{name}"] = param.new_zeros(shape, dtype=torch.float32)
            eye = torch.eye(d, dtype=torch.float32, device=param.device)
            state[f"root_{name}"] = eye.expand(n, d, d).clone()
        state["preconditioned"] = False

    def _plan(self, group: dict[str, Any], param: Tensor) -> BlockPlan:
        plan = self._plans.get(param)
        if plan is None:
            plan = plan_blocks(
                param.shape, group["block_size"], group["max_preconditioned_dim"], group["precondition_1d"]
            )
            self._plans[param] = plan
        return plan

    def _accumulate(self, group: dict[str, Any], param: Tensor, grad: Tensor, step: int) -> None:
        """Phase 1 and 2: moments, the graft's second moment, and the factors' statistics."""
        state = self.state[param]
        state["step"] += 1
        grad32 = grad.float()
        beta1, beta2 = group["betas"]
        state["exp_avg"].lerp_(grad32, 1.0 - beta1)
        if "graft_sq" in state:
            grafting.update_second_moment(group["graft"], state["graft_sq"], grad32, group["graft_beta2"])
        plan = self._plan(group, param)
        if plan.preconditioned and step % self.statistics_frequency == 0:
            for g, stack in enumerate(plan.split(grad32)):
                update_statistics(_group_tensors(state, "factor", g, plan), stack, beta2)

    def _snapshot(self, index: int, group: dict[str, Any], param: Tensor) -> list[FactorSnapshot]:
        plan = self._plan(group, param)
        state = self.state[param]
        snapshots = []
        for g, block_group in enumerate(plan.groups):
            exponent = group["exponent_override"] or 2 * block_group.order
            for i, keep in enumerate(block_group.preconditioned):
                if keep:
                    snapshots.append(
                        FactorSnapshot(
                            param_index=index,
                            name=f"{g}_{i}",
                            matrices=state[f"factor_{g}_{i}"].detach().clone(),
                            exponent=exponent,
                            epsilon=group["epsilon"],
                            relative_epsilon=group["relative_epsilon"],
                        )
                    )
        return snapshots

    def _install(self, param: Tensor, snapshot: FactorSnapshot, result: RootResult) -> None:
        """Install accepted roots; a rejected root keeps the previous one."""
        state = self.state[param]
        root = state[f"root_{snapshot.name}"]
        accepted = result.accepted.to(root.device)
        root.copy_(torch.where(accepted.view(-1, 1, 1), result.root.to(root.device, root.dtype), root))
        state["preconditioned"] = True
        n_accepted = int(accepted.sum())
        self._counters["roots_accepted"] += n_accepted
        self._counters["roots_rejected"] += accepted.numel() - n_accepted
        finite = result.residual[result.residual.isfinite()]
        if finite.numel():
            self._max_residual = max(self._max_residual, float(finite.max()))

    def _apply_update(self, group: dict[str, Any], param: Tensor) -> None:
        """Phase 4: direction, grafting, decoupled weight decay and the parameter step."""
        state = self.state[param]
        step = state["step"]
        beta1 = group["betas"][0]
        momentum_hat = state["exp_avg"] / (1.0 - beta1**step)
        diagonal = grafting.diagonal_update(
            group["graft"],
            momentum_hat,
            state.get("graft_sq"),
            step,
            group["graft_beta2"],
            group["graft_epsilon"],
        )
        plan = self._plan(group, param)
        if plan.preconditioned and state["preconditioned"]:
            directions = [
                precondition(stack, _group_tensors(state, "root", g, plan))
                for g, stack in enumerate(plan.split(momentum_hat))
            ]
            if group["graft"] != "none":
                directions = [
                    grafting.graft_norm(direction, diag)
                    for direction, diag in zip(directions, plan.split(diagonal), strict=True)
                ]
            update = plan.merge(directions)
        else:
            update = diagonal
        if group["weight_decay"]:
            param.mul_(1.0 - group["lr"] * group["weight_decay"])
        param.add_(update.to(param.dtype), alpha=-group["lr"])

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["shampoo"] = {
            "step": self._step,
            "refresh_requested": self._refresh_requested,
            "counters": dict(self._counters),
            "max_root_residual": self._max_residual,
            "engine": self._engine.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = self._check_compatible(state_dict)
        super().load_state_dict(state_dict)
        # torch casts floating state to each parameter's dtype; Shampoo's state is fp32 by contract.
        for param, saved_state in saved:
            state = self.state[param]
            for key, value in saved_state.items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    state[key] = value.to(device=param.device, dtype=torch.float32, copy=True)
        extra = state_dict.get("shampoo", {})
        self._step = int(extra.get("step", 0))
        self._refresh_requested = bool(extra.get("refresh_requested", False))
        self._counters.update(extra.get("counters", {}))
        self._max_residual = float(extra.get("max_root_residual", 0.0))
        self._engine.load_state_dict(extra.get("engine", {}))

    def _check_compatible(self, state_dict: dict[str, Any]) -> list[tuple[Tensor, dict[str, Any]]]:
        """Pair saved state with parameters, refusing any mismatch before anything is loaded."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Shampoo checkpoint has {len(saved_groups)} parameter groups, the optimizer has "
                f"{len(self.param_groups)}: build the optimizer with the same groups as the saved run."
            )
        pairs = []
        for saved_group, group in zip(saved_groups, self.param_groups, strict=True):
            if len(saved_group["params"]) != len(group["params"]):
                raise ValueError(
                    f"Shampoo checkpoint group has {len(saved_group['params'])} parameters, the optimizer's "
                    f"has {len(group['params'])}: build the optimizer over the same parameters."
                )
            for position, (key, param) in enumerate(zip(saved_group["params"], group["params"], strict=True)):
                saved_state = state_dict["state"].get(key)
                if saved_state:
                    self._check_param_state(group, saved_group, position, param, saved_state)
                    pairs.append((param, saved_state))
        return pairs

    def _check_param_state(
        self,
        group: dict[str, Any],
        saved_group: dict[str, Any],
        position: int,
        param: Tensor,
        saved_state: dict[str, Any],
    ) -> None:
        name = _name(group, position, param)
        for option in _STRUCTURAL_OPTIONS:
            saved_value = saved_group.get(option, group[option])
            if saved_value != group[option]:
                raise ValueError(
                    f"Shampoo checkpoint of {name} was saved with {option}={saved_value!r}, the optimizer "
                    f"has {option}={group[option]!r}: construct the optimizer with {option}={saved_value!r}."
                )
        expected = {"exp_avg": tuple(param.shape)}
        for factor, shape in _factor_shapes(self._plan(group, param)):
            expected[f"factor_{factor}"] = expected[f"root_{factor}"] = shape
        for key, shape in expected.items():
            value = saved_state.get(key)
            found = tuple(value.shape) if isinstance(value, Tensor) else "missing"
            if found != shape:
                raise ValueError(
                    f"Shampoo checkpoint does not match {name}: state {key!r} has shape {found}, expected "
                    f"{shape}. Was it saved for another model?"
                )


def _factor_shapes(plan: BlockPlan) -> list[tuple[str, tuple[int, int, int]]]:
    """``(name, (n_blocks, d, d))`` for every factor of the plan, name ``"{group}_{dim}"``."""
    return [
        (f"{g}_{i}", (block_group.n_blocks, size, size))
        for g, block_group in enumerate(plan.groups)
        for i, (size, keep) in enumerate(
            zip(block_group.block_shape, block_group.preconditioned, strict=True)
        )
        if keep
    ]


def _group_tensors(state: dict[str, Any], kind: str, g: int, plan: BlockPlan) -> list[Tensor | None]:
    return [
        state[f"{kind}_{g}_{i}"] if keep else None for i, keep in enumerate(plan.groups[g].preconditioned)
    ]


def _name(group: dict[str, Any], position: int, param: Tensor) -> str:
    names = group.get("param_names")
    if names:
        return f"parameter {names[position]!r} (shape {tuple(param.shape)})"
    return f"parameter {position} of its group (shape {tuple(param.shape)})"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _validate_group(group: dict[str, Any]) -> None:
    beta1, beta2 = group["betas"]
    _require(group["lr"] >= 0, f"lr must be >= 0, got {group['lr']}")
    _require(0 <= beta1 < 1, f"betas[0] must be in [0, 1), got {beta1}")
    _require(0 < beta2 <= 1, f"betas[1] must be in (0, 1] (1 = running sum), got {beta2}")
    _require(group["epsilon"] >= 0, f"epsilon must be >= 0, got {group['epsilon']}")
    _require(group["weight_decay"] >= 0, f"weight_decay must be >= 0, got {group['weight_decay']}")
    _require(group["block_size"] >= 1, f"block_size must be >= 1, got {group['block_size']}")
    _require(
        group["graft"] in grafting.GRAFTS, f"graft must be one of {grafting.GRAFTS}, got {group['graft']!r}"
    )
    _require(0 < group["graft_beta2"] <= 1, f"graft_beta2 must be in (0, 1], got {group['graft_beta2']}")
    _require(group["graft_epsilon"] >= 0, f"graft_epsilon must be >= 0, got {group['graft_epsilon']}")
    override = group["exponent_override"]
    _require(override is None or override >= 1, f"exponent_override must be None or >= 1, got {override}")
    limit = group["max_preconditioned_dim"]
    _require(limit is None or limit >= 1, f"max_preconditioned_dim must be None or >= 1, got {limit}")
