"""The :class:`Shampoo` optimizer: one step through statistics, refresh, moments and update.

``step()`` reads top-down: the layout (:mod:`.layout`) says which parameters this rank computes and gives
their plain local tensors; the phases run on those — the Kronecker statistics (:mod:`.kronecker`), the
refresh (:mod:`.refresh`: snapshot, compute, install), the preconditioner's moments and update
(:mod:`.preconditioners`) — and the layout's collective ends the step.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import statedict
from .blocking import BlockPlan, plan_blocks
from .cost import parameter_cost
from .kronecker import update_statistics
from .layout import Layout, ShardLocal, choose_layout, is_dtensor
from .options import RefreshOptions, StepOptions, require, validate_group
from .preconditioners import PRECONDITIONERS, group_tensors
from .refresh import RefreshEngine, RefreshPolicy, RefreshSettings

# A gradient whose statistics could overflow fp32 is skipped like a non-finite one: numel·max|g|² above
# this bounds every entry of G₍ᵢ₎G₍ᵢ₎ᵀ (Cauchy–Schwarz), with headroom for a running sum (β2 = 1).
OVERFLOW_LIMIT = torch.finfo(torch.float32).max * 1e-6


class _Entry(NamedTuple):
    """A parameter with a gradient this step; ``index`` is its position over all groups. ``weight`` and
    ``grad`` are the plain local tensors this rank computes on."""

    index: int
    group: dict[str, Any]
    position: int
    param: Tensor
    weight: Tensor
    grad: Tensor


class Shampoo(Optimizer):
    r"""Shampoo with grafting, blocking and delayed preconditioner refreshes (Anil et al., 2020).

    Per block with gradient ``G`` and Kronecker factors ``S_i`` (one per preconditioned dim):

    .. math::
        S_i ← β_2 S_i + (1−β_2) G_{(i)} G_{(i)}^⊤,\quad P_i = (S_i + ε_i I)^{−1/p},\quad
        D = \hat M ×_1 P_1 ⋯ ×_k P_k,\quad U = D ‖A‖/‖D‖,\quad W ← W(1 − η λ) − η U

    with ``M̂`` the bias-corrected first moment, ``A`` the graft's (diagonal method's) update and
    ``p = 2k / exponent_multiplier`` (or ``exponent_override``). With
    ``preconditioner="eigenvalue_corrected"`` the refresh computes the factors' eigenbases instead and the
    step runs Adam in them (see :mod:`lightning_shampoo.preconditioners`). Refreshes run every
    ``precondition_frequency`` steps from ``start_preconditioning_step`` on; a result that fails its checks
    keeps the previous one.

    Args:
        params: parameters or parameter groups (named parameters are used in messages).
        lr: learning rate η.
        betas: ``(β1, β2)``: momentum and the factors' EMA (``β2 = 1``: plain running sum).
        epsilon: ridge ε added before the root (relative to ``λmax(S_i)`` when ``relative_epsilon``); with
            ``pseudo_inverse`` the threshold below which eigenvalues are dropped instead.
        weight_decay: decoupled weight decay λ.
        block_size: largest factor dimension; larger dims are split into blocks.
        precondition_frequency: steps between refreshes.
        start_preconditioning_step: first step that refreshes (steps count from 1).
        graft: diagonal method giving the step size: adam, adagrad, rmsprop, sgd or none.
        graft_beta2: β of the diagonal method's second moment (the graft, or Adam in the eigenbasis).
        graft_epsilon: ε of the diagonal method's denominator.
        exponent_override: root order p for every block instead of ``2k / exponent_multiplier``.
        relative_epsilon: scale ``epsilon`` by the factor's largest eigenvalue.
        inverse_root: ``"eigh"`` or ``"newton"`` (coupled Newton iteration).
        preconditioner: ``"root_inverse"`` (Shampoo) or ``"eigenvalue_corrected"`` (Adam in the factors'
            eigenbasis: EShampoo / SOAP).
        exponent_multiplier: the root exponent is ``−exponent_multiplier/(2k)`` (2: −1/2 per factor of a
            matrix, 4/3: −1/3).
        pseudo_inverse: invert eigenvalues at or below ε as 0 instead of adding a ridge (eigh only).
        statistics_frequency: update the factors every this many steps (cheaper steps).
        max_preconditioned_dim: dims larger than this keep an identity factor (e.g. vocabularies).
        precondition_1d: give order-1 parameters (biases, norms) a factor; else the diagonal method only.
        max_root_residual: reject a root whose residual check exceeds this.
        refresh: where refreshes are computed and when they are installed (see :mod:`.refresh`): ``"sync"``
            inside ``step()``; ``"async"`` on a background CPU thread, installed exactly ``refresh_lag``
            steps after their snapshot (bitwise the trajectory of ``"sync"`` with the same lag);
            ``"best_effort"`` on the thread, installed as soon as ready and at most ``refresh_lag`` steps
            after their snapshot (not reproducible).
        refresh_lag: steps from a snapshot to its install; default 0 for ``"sync"``, else
            ``precondition_frequency``.
        refresh_policy: decides which steps refresh: a :class:`RefreshPolicy` or a function
            ``step -> bool``; default every ``precondition_frequency`` steps.
        refresh_threads: intra-op CPU threads of the refresh computation, in every mode (so sync and
            async agree bitwise); default: torch's thread count.
        check_finite: skip parameters whose gradient is non-finite or would overflow the statistics (one
            host sync per step).
        distribute: with several data-parallel ranks and replicated parameters (DDP), ``"sharded"`` gives
            every parameter one owner rank that alone keeps its state and computes its update (one
            all-gather per step); ``"replicated"``: every rank does all the work. DTensor parameters
            (FSDP2) are preconditioned shard-locally. See :mod:`.layout`.
        process_group: the data-parallel group; default: the default group, if initialized when the first
            step runs (or see :meth:`set_process_group`).
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
        preconditioner: str = "root_inverse",
        exponent_multiplier: float = 1.0,
        pseudo_inverse: bool = False,
        statistics_frequency: int = 1,
        max_preconditioned_dim: int | None = None,
        precondition_1d: bool = True,
        max_root_residual: float = 0.1,
        refresh: str = "sync",
        refresh_lag: int | None = None,
        refresh_policy: RefreshPolicy | Callable[[int], bool] | None = None,
        refresh_threads: int | None = None,
        check_finite: bool = True,
        distribute: str = "sharded",
        process_group: Any = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, epsilon=epsilon, weight_decay=weight_decay, block_size=block_size,
            graft=graft, graft_beta2=graft_beta2, graft_epsilon=graft_epsilon,
            exponent_override=exponent_override, exponent_multiplier=exponent_multiplier,
            pseudo_inverse=pseudo_inverse,
            relative_epsilon=relative_epsilon, max_preconditioned_dim=max_preconditioned_dim,
            precondition_1d=precondition_1d,
        )  # fmt: skip
        validate_group(defaults)
        self.options = StepOptions(
            preconditioner, inverse_root, max_root_residual, statistics_frequency, check_finite, distribute
        )
        self.refresh_options = RefreshOptions.from_arguments(
            refresh,
            refresh_lag,
            refresh_policy,
            refresh_threads,
            precondition_frequency,
            start_preconditioning_step,
        )
        super().__init__(params, defaults)
        self._preconditioner = PRECONDITIONERS[preconditioner]()
        self._engine = RefreshEngine(
            RefreshSettings(inverse_root, max_root_residual),
            refresh,
            self.refresh_options.lag,
            refresh_threads,
        )
        self._policy = self.refresh_options.policy
        self._step = 0
        self._refresh_requested = False
        self._plans: dict[Tensor, BlockPlan] = {}
        self._warned: set[tuple[str, int]] = set()
        self._counters = dict.fromkeys(
            ("nonfinite_skips", "refreshes", "roots_accepted", "roots_rejected", "rejected_refreshes"), 0
        )
        self._max_residual = 0.0
        self._process_group = process_group
        self._layout: Layout | None = None
        self._consolidated: dict[str, Any] | None = None
        self._consolidated_step: int | None = None

    # ------------------------------------------------------------------ public API

    @property
    def layout(self) -> Layout:
        """Where the work and state live across ranks (decided at first use: a collective when sharded)."""
        if self._layout is None:
            params = self._params()
            names = [self._name(group, position, param) for group, position, param in self._indexed()]
            self._layout = choose_layout(
                self.options.distribute, self._process_group, params, names, self._costs(params)
            )
            for index, param in enumerate(params):
                if not self._layout.owns(index):
                    self.state.pop(param, None)
        return self._layout

    @property
    def policy(self) -> RefreshPolicy:
        """The refresh schedule (see :meth:`set_refresh_policy`)."""
        return self._policy

    def set_refresh_policy(self, policy: RefreshPolicy) -> None:
        """Replace the refresh schedule (e.g. by :class:`~lightning_shampoo.callbacks.ShampooCallback`)."""
        require(isinstance(policy, RefreshPolicy), f"expected a RefreshPolicy, got {policy!r}")
        self._policy = policy

    @property
    def refresh_mode(self) -> str:
        """``"sync"``, ``"async"`` or ``"best_effort"``: the ``refresh`` option."""
        return self._engine.mode

    @property
    def refresh_lag(self) -> int:
        """Steps from a snapshot to the install of its results (the bound on it for ``"best_effort"``)."""
        return self._engine.lag

    def request_refresh(self) -> None:
        """Refresh every preconditioner at the next step, whatever the policy says."""
        self._refresh_requested = True

    def set_process_group(self, group: Any) -> None:
        """Use ``group`` as the data-parallel group (e.g. from a Lightning strategy's ``setup``).

        Collective: call on every rank of ``group``, before the first step (state loaded from a complete
        checkpoint is kept for the parameters this rank owns).
        """
        if self._step and self._layout is not None and self._layout.shard_info() is not None:
            raise RuntimeError(
                "Shampoo.set_process_group() after sharded steps would lose the other ranks' state; call it "
                "before the first step."
            )
        self._process_group = group
        self._layout = None
        _ = self.layout

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (e.g. unfrozen layers); where the state is sharded, its parameters get owners too
        (collective then: call on every rank, as DDP training does)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        validate_group(group)
        require(
            not (group["pseudo_inverse"] and self.options.inverse_root == "newton"),
            "pseudo_inverse needs inverse_root='eigh' (the coupled Newton iteration has no pseudo-inverse)",
        )
        if getattr(self, "_layout", None) is not None:
            params = self._params()
            names = [self._name(group, position, param) for group, position, param in self._indexed()]
            self._layout = self._layout.extend(params, names, self._costs(params))

    def metrics(self) -> dict[str, float]:
        """Plain floats for logging.

        ``nonfinite_skips`` (parameters skipped for a non-finite or overflowing gradient), ``refreshes``
        (submitted), ``roots_accepted``, ``roots_rejected`` (matrices, roots or bases),
        ``rejected_refreshes`` (refreshes whose every result was rejected), ``max_root_residual``, ``step``,
        and from the refresh engine: ``installs``, ``in_flight``, ``refresh_latency_s`` /
        ``refresh_latency_mean_s`` (snapshot → ready), ``staleness`` / ``staleness_mean`` (steps from
        snapshot to use), ``wait_s`` (seconds ``step()`` was blocked on refresh work).
        """
        out = {name: float(value) for name, value in self._counters.items()}
        out["max_root_residual"] = self._max_residual
        out["step"] = float(self._step)
        out.update(self._engine.metrics())
        return out

    def drain(self) -> None:
        """Block until every in-flight refresh is computed (e.g. before a checkpoint, which then holds the
        results); re-raises a failed computation."""
        self._engine.drain()

    def close(self, wait: bool = True) -> None:
        """Stop the background refresh worker, if any (idempotent; ``wait``: for the refresh it computes).

        Pending refreshes are kept: stepping again restarts the worker and the trajectory is unchanged.
        Called on leaving ``with Shampoo(...) as opt:``; garbage collection and interpreter exit stop the
        worker without waiting.
        """
        self._engine.close(wait)

    def __enter__(self) -> Shampoo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    @torch.compiler.disable  # Python-side counters and the refresh schedule: always eager, also in compile
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        # A failed refresh surfaces here, before this step changes anything.
        self._engine.raise_if_failed()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layout = self.layout
        entries = self._entries_with_grad()
        if not entries:
            return loss
        # Where sharded, this rank's parameters only; the others arrive with the layout's collective.
        entries = [entry for entry in entries if layout.owns(entry.index)]
        self._step += 1
        step = self._step
        updating = [entry for entry, ok in zip(entries, self._usable(entries), strict=True) if ok]
        for entry in updating:
            self.state[entry.param]["step"] += 1
        grads = {entry.index: entry.grad.float() for entry in updating}
        if step % self.options.statistics_frequency == 0:
            for entry in updating:
                plan, state = self._plan(entry.group, entry.param), self.state[entry.param]
                for g, stack in enumerate(plan.split(grads[entry.index]) if plan.preconditioned else []):
                    update_statistics(group_tensors(state, "factor", g, plan), stack, entry.group["betas"][1])
        if self._refresh_requested or self._policy.due(step):
            self._refresh_requested = False
            self._submit(step, entries)
        self._install(self._engine.due(step))
        for group, members in _by_group(updating):
            states = [self.state[entry.param] for entry in members]
            plans = [self._plan(group, entry.param) for entry in members]
            self._preconditioner.accumulate(group, states, [grads[e.index] for e in members], plans)
            updates = self._preconditioner.updates(group, states, plans)
            weights = [entry.weight for entry in members]
            if group["weight_decay"]:
                torch._foreach_mul_(weights, 1.0 - group["lr"] * group["weight_decay"])
            updates = [update.to(weight.dtype) for update, weight in zip(updates, weights, strict=True)]
            torch._foreach_add_(weights, updates, alpha=-group["lr"])
        layout.after_step()
        return loss

    def _entries_with_grad(self) -> list[_Entry]:
        entries = []
        layout = self.layout
        for index, (group, position, param) in enumerate(self._indexed()):
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise ValueError(
                    f"Shampoo does not support sparse gradients ({self._name(group, position, param)}); "
                    "use dense embeddings (sparse=False) or another optimizer for this parameter."
                )
            if torch.is_complex(param) or torch.is_complex(param.grad):
                raise TypeError(
                    f"Shampoo does not support complex parameters ({self._name(group, position, param)}); "
                    "view them as real with torch.view_as_real."
                )
            weight = layout.local(param)
            if layout.owns(index) and not self.state[param]:
                self._preconditioner.init_state(self.state[param], weight, self._plan(group, param), group)
            entries.append(_Entry(index, group, position, param, weight, layout.local(param.grad)))
        return entries

    def _usable(self, entries: list[_Entry]) -> list[bool]:
        """Per entry: its gradient is finite and cannot overflow the statistics (else it is skipped)."""
        if not self.options.check_finite:
            return [True] * len(entries)
        # One fused pass over the gradients and one host sync for all of them, like AMP's found-inf check.
        checked = [entry for entry in entries if entry.grad.numel()]
        largest: dict[int, float] = {}
        if checked:
            max_abs = torch._foreach_norm([entry.grad for entry in checked], float("inf"))
            device = max_abs[0].device
            values = torch.stack([m.to(device, torch.float64) for m in max_abs]).tolist()
            largest = {entry.index: value for entry, value in zip(checked, values, strict=True)}
        bad = {
            entry.index: value
            for entry in checked
            if not math.isfinite(value := largest[entry.index])
            or value * value * entry.grad.numel() > OVERFLOW_LIMIT
        }
        ok = self.layout.agree([entry.index not in bad for entry in entries])
        for entry, usable in zip(entries, ok, strict=True):
            if not usable:
                self._counters["nonfinite_skips"] += 1
                value = bad.get(entry.index, math.nan)
                problem = (
                    "non-finite gradient"
                    if not math.isfinite(value)
                    else (f"gradient too large (max |g| = {value:.3g}: its statistics would overflow fp32)")
                )
                self._warn_once(
                    ("skip", entry.index),
                    f"Shampoo: {problem} in {self._name(entry.group, entry.position, entry.param)}; its "
                    "update is "
                    "skipped and its statistics and moments are left untouched (further occurrences are only "
                    "counted in metrics()['nonfinite_skips']). Check the loss scale or clip gradients.",
                )
        return ok

    def _submit(self, step: int, entries: list[_Entry]) -> None:
        snapshots = []
        for entry in entries:
            plan = self._plan(entry.group, entry.param)
            state = self.state[entry.param]
            snapshots += self._preconditioner.snapshot(
                entry.index, state, plan, entry.group, self._engine.capture
            )
        if snapshots:
            self._counters["refreshes"] += 1
            self._engine.submit(step, snapshots)

    def _install(self, installs: list[Any]) -> None:
        """Install accepted results; a rejected one keeps the previous matrix. A parameter switches to its
        preconditioner only once one of its results is accepted."""
        if not installs:
            return
        indexed = list(self._indexed())
        accepted = rejected = 0
        for snapshot, result in installs:
            if not self.layout.owns(snapshot.param_index):  # loaded before the ownership was known
                continue
            group, _, param = indexed[snapshot.param_index]
            state = self.state[param]
            count = self._preconditioner.install(state, self._plan(group, param), snapshot.name, result)
            state["preconditioned"] = bool(state["preconditioned"] or count)
            accepted += count
            rejected += result.accepted.numel() - count
            finite = result.residual[result.residual.isfinite()]
            if finite.numel():
                self._max_residual = max(self._max_residual, float(finite.max()))
        self._counters["roots_accepted"] += accepted
        self._counters["roots_rejected"] += rejected
        if rejected and not accepted:
            self._counters["rejected_refreshes"] += 1
            self._warn_once(
                ("rejected", 0),
                f"Shampoo: every result of a refresh was rejected ({rejected} matrices failed their checks); "
                "the previous preconditioners stay, and parameters never preconditioned keep their diagonal "
                "update. Check metrics()['max_root_residual'] and the factors for non-finite values.",
            )

    # ------------------------------------------------------------------ helpers

    def _indexed(self) -> Iterable[tuple[dict[str, Any], int, Tensor]]:
        for group in self.param_groups:
            for position, param in enumerate(group["params"]):
                yield group, position, param

    def _params(self) -> list[Tensor]:
        return [param for _, _, param in self._indexed()]

    def _costs(self, params: list[Tensor]) -> list[float]:
        """Each parameter's work per step (whole, whatever the layout): what ownership balances."""
        frequency, kind = self.refresh_options.frequency, self.options.preconditioner
        groups = [group for group, _, _ in self._indexed()]
        return [
            parameter_cost(_planner(group)(tuple(param.shape)), frequency, kind)
            for group, param in zip(groups, params, strict=True)
        ]

    def _plan(self, group: dict[str, Any], param: Tensor) -> BlockPlan:
        plan = self._plans.get(param)
        if plan is None:
            plan = self._plans[param] = self._known_layout().plan(param, _planner(group))
        return plan

    def _known_layout(self) -> Layout:
        """The layout if decided, else what is known without a collective: every rank keeps everything (a
        complete checkpoint loads whole; the first step then drops the state of others' parameters)."""
        if self._layout is not None:
            return self._layout
        return ShardLocal(self._process_group) if any(is_dtensor(p) for p in self._params()) else Layout()

    def _name(self, group: dict[str, Any], position: int, param: Tensor) -> str:
        names = group.get("param_names")
        if names:
            return f"parameter {names[position]!r} (shape {tuple(param.shape)})"
        return f"parameter {position} of its group (shape {tuple(param.shape)})"

    def _warn_once(self, key: tuple[str, int], message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=_caller_stacklevel())

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The complete state, keyed by parameter (and block), never by rank.

        Where the state is sharded over ranks, call :meth:`consolidate_state_dict` on every rank first
        (Lightning, :func:`~lightning_shampoo.accelerate.prepare_shampoo` and :mod:`.checkpoint` do); a
        sharded state dict that was not consolidated this step raises rather than save a part silently.
        """
        if self._known_layout().shard_info() is None:
            return self.shard_state_dict()
        if self._consolidated_step == self._step and self._consolidated is not None:
            return self._consolidated
        raise RuntimeError(
            "Shampoo's state is sharded over the data-parallel ranks, so this rank holds only its share: "
            "call "
            "optimizer.consolidate_state_dict() on every rank before state_dict() (Lightning does it; with "
            "Accelerate call lightning_shampoo.accelerate.prepare_shampoo(accelerator, optimizer) once "
            "after prepare), or save per rank with lightning_shampoo.checkpoint.sharded_state_dict."
        )

    def shard_state_dict(self) -> dict[str, Any]:
        """This rank's share of the state (all of it unless sharded; marked when it is a share)."""
        state = super().state_dict()
        params, layout = self._params(), self._known_layout()
        # New dicts: torch's state_dict() hands out the live per-parameter dicts themselves.
        state["state"] = {
            index: {key: self._export(layout, params[index], key, item) for key, item in values.items()}
            for index, values in state["state"].items()
        }
        state["shampoo"] = {
            "preconditioner": self.options.preconditioner,
            "step": self._step,
            "refresh_requested": self._refresh_requested,
            "counters": dict(self._counters),
            "max_root_residual": self._max_residual,
            "engine": self._engine.state_dict(),
        }
        shard = layout.shard_info()
        if shard is not None:
            state["shampoo"]["shard"] = shard
        return state

    @staticmethod
    def _export(layout: Layout, param: Tensor, key: str, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        return layout.export(param, value, per_block=statedict.is_block_key(key))

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the complete state on rank ``to``, whose :meth:`state_dict` (this step) returns it.

        Collective over the data-parallel group (call it on every rank), like ``ZeroRedundancyOptimizer``'s;
        Lightning calls it before saving. Elsewhere :meth:`state_dict` then returns this rank's share.
        """
        self._consolidated = self.layout.gather(self.shard_state_dict(), to)
        if self._consolidated is None:
            self._consolidated = self.shard_state_dict()
        self._consolidated_step = self._step

    def param_specs(self) -> list[statedict.ParamSpec]:
        """What a checkpoint must hold for every parameter (saved shapes), in optimizer order."""
        specs, layout = [], self._known_layout()
        for index, (group, position, param) in enumerate(self._indexed()):
            plan, like = self._plan(group, param), layout.local(param)
            shapes = {
                key: layout.saved_shape(param, shape) if statedict.is_block_key(key) else tuple(param.shape)
                for key, shape in self._preconditioner.state_shapes(like, plan, group).items()
            }
            specs.append(statedict.ParamSpec(self._name(group, position, param), layout.owns(index), shapes))
        return specs

    def check_state_dict(self, state_dict: dict[str, Any], load_values: bool = True) -> None:
        """Raise ``ValueError`` if ``state_dict`` cannot be loaded (``load_values``: also check values)."""
        statedict.validate(
            state_dict, self.param_groups, self.param_specs(), self.options.preconditioner, load_values
        )

    def fresh_state(self, index: int) -> dict[str, Any]:
        """The state a new parameter ``index`` starts with, as saved (e.g. a template to load into)."""
        group, _, param = list(self._indexed())[index]
        layout, state = self._known_layout(), {}
        self._preconditioner.init_state(state, layout.local(param), self._plan(group, param), group)
        return {key: self._export(layout, param, key, value) for key, value in state.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pairs = statedict.validate(
            state_dict, self.param_groups, self.param_specs(), self.options.preconditioner
        )
        layout = self._known_layout()
        part = statedict.owned_part(state_dict, [layout.owns(i) for i in range(len(self._params()))])
        self._consolidated = self._consolidated_step = None
        super().load_state_dict(part)
        # torch casts floating state to each parameter's dtype; Shampoo's state is fp32 by contract.
        params = self._params()
        for index, saved in pairs:
            state = self.state[params[index]]
            for key, value in saved.items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    value = layout.import_(value)
                    state[key] = value.to(device=params[index].device, dtype=torch.float32, copy=True)
                elif key == "step":
                    state[key] = int(value)
        extra = part.get("shampoo", {})
        self._step = int(extra.get("step", 0))
        self._refresh_requested = bool(extra.get("refresh_requested", False))
        self._counters.update({key: int(value) for key, value in extra.get("counters", {}).items()})
        self._max_residual = float(extra.get("max_root_residual", 0.0))
        self._engine.load_state_dict(statedict.map_tensors(extra.get("engine", {}), layout.import_))

    # ------------------------------------------------------------------ copies

    def __getstate__(self) -> dict[str, Any]:
        # The engine holds a thread and events: a copy carries its pending refreshes instead.
        state = {key: value for key, value in self.__dict__.items() if key not in ("_engine", "_layout")}
        state["_engine_state"] = self._engine.state_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        engine_state = state.pop("_engine_state", {"pending": []})
        super().__setstate__(state)
        options, refresh = self.options, self.refresh_options
        self._engine = RefreshEngine(
            RefreshSettings(options.inverse_root, options.max_root_residual),
            refresh.mode,
            refresh.lag,
            refresh.threads,
        )
        self._engine.load_state_dict(engine_state)
        self._layout = None


def unwrap(optimizer: Any) -> Any:
    """The optimizer inside trainer wrappers (Lightning's ``LightningOptimizer`` and Accelerate's
    ``AcceleratedOptimizer`` both keep it in ``.optimizer``)."""
    while isinstance(getattr(optimizer, "optimizer", None), Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _planner(group: dict[str, Any]) -> Callable[[tuple[int, ...]], BlockPlan]:
    """Shapes → blocks under the group's blocking options."""
    return lambda shape: plan_blocks(
        shape, group["block_size"], group["max_preconditioned_dim"], group["precondition_1d"]
    )


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning raised in the calling function to the first frame outside
    torch, this package and the trainers that wrap ``step()`` (Lightning, Accelerate): the user's line."""
    names = ("torch", "lightning", "pytorch_lightning", "accelerate", __package__)
    files = [getattr(sys.modules.get(name), "__file__", None) for name in names]
    folders = tuple(os.path.dirname(file) + os.sep for file in files if file)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(folders):
        frame, level = frame.f_back, level + 1
    return level


def _by_group(entries: list[_Entry]) -> list[tuple[dict[str, Any], list[_Entry]]]:
    """The entries of each param group, in order: the unit the batched (foreach) phases work on."""
    groups: dict[int, tuple[dict[str, Any], list[_Entry]]] = {}
    for entry in entries:
        groups.setdefault(id(entry.group), (entry.group, []))[1].append(entry)
    return list(groups.values())
