"""The :class:`Shampoo` optimizer: orchestration of blocking, statistics, refresh and grafting."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed, grafting
from .blocking import BlockPlan, plan_blocks
from .distributed import DISTRIBUTE_MODES, ParameterSync, Sharding, local
from .kronecker import precondition, update_statistics
from .refresh import (
    MODES,
    EveryNSteps,
    FactorSnapshot,
    FunctionPolicy,
    RefreshEngine,
    RefreshPolicy,
    RootSettings,
)
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
        refresh: where roots are computed and when they are installed (see :mod:`.refresh`):
            ``"sync"``: inside ``step()``; ``"async"``: on a background CPU thread, used from exactly
            ``refresh_lag`` steps after their snapshot (the step waits if they are late), bitwise the
            trajectory of ``"sync"`` with the same lag; ``"best_effort"``: on the background thread, used
            from the first step boundary at which they are ready and at most ``refresh_lag`` steps after
            their snapshot (the step waits then); it never waits otherwise and is not reproducible.
            Background modes compute on the host CPU (from CUDA: pinned, non-blocking copies) in a worker
            thread niced below training (Linux), started at the first refresh.
        refresh_lag: steps from a snapshot to the install of its roots (the bound on it for
            ``"best_effort"``); default 0 for ``"sync"``, ``precondition_frequency`` otherwise. With another
            schedule (``OnRequest``, a function) pick it yourself: at most the steps between refreshes.
        refresh_policy: decides which steps refresh: a :class:`RefreshPolicy` (e.g. ``OnRequest()``) or a
            function ``step -> bool``; default every ``precondition_frequency`` steps.
        refresh_threads: intra-op CPU threads of the root computation, in every mode (so sync and async
            agree bitwise); default: torch's thread count. Keep it below the core count for background
            refreshes next to CPU training, so the two do not share cores.
        check_finite: skip parameters with non-finite gradients (one host sync per step).
        distribute: with a process group of several ranks and replicated parameters (DDP),
            ``"sharded"`` gives every parameter one owner rank (cost-balanced) that alone keeps its state and
            computes its update, then all-gathers the parameters in one collective per step (see
            :mod:`.distributed`); ``"replicated"``: every rank does all the work. DTensor parameters (FSDP2)
            are always preconditioned shard-locally. Checkpoints: :meth:`consolidate_state_dict`.
        process_group: the data-parallel group to shard over; default: the default group, if initialized
            when the first step runs (or see :meth:`set_process_group`).
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
        refresh: str = "sync",
        refresh_lag: int | None = None,
        refresh_policy: RefreshPolicy | Callable[[int], bool] | None = None,
        refresh_threads: int | None = None,
        check_finite: bool = True,
        distribute: str = "sharded",
        process_group: Any = None,
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
        _require(refresh in MODES, f"refresh must be one of {MODES}, got {refresh!r}")
        _require(
            distribute in DISTRIBUTE_MODES,
            f"distribute must be one of {DISTRIBUTE_MODES}, got {distribute!r}",
        )
        if refresh_lag is None:
            refresh_lag = 0 if refresh == "sync" else precondition_frequency
        _require(refresh_lag >= 0, f"refresh_lag must be >= 0, got {refresh_lag}")
        _require(
            refresh_threads is None or refresh_threads >= 1,
            f"refresh_threads must be None or >= 1, got {refresh_threads}",
        )
        if refresh_policy is not None and not isinstance(refresh_policy, RefreshPolicy):
            _require(
                callable(refresh_policy),
                f"refresh_policy must be a RefreshPolicy or a function step -> bool, got {refresh_policy!r}",
            )
            refresh_policy = FunctionPolicy(refresh_policy)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _validate_group(group)
        self.statistics_frequency = statistics_frequency
        self.check_finite = check_finite
        self.policy = refresh_policy or EveryNSteps(start_preconditioning_step, precondition_frequency)
        self._engine = RefreshEngine(
            RootSettings(inverse_root, max_root_residual),
            mode=refresh,
            lag=refresh_lag,
            threads=refresh_threads,
        )
        self._step = 0
        self._refresh_requested = False
        self._plans: dict[Tensor, BlockPlan] = {}
        self._warned_nonfinite: set[int] = set()
        self._counters = {"nonfinite_skips": 0, "refreshes": 0, "roots_accepted": 0, "roots_rejected": 0}
        self._max_residual = 0.0
        self._distribute = distribute
        self._process_group = process_group
        self._precondition_frequency = precondition_frequency
        self._sharding_resolved = False
        self._sharding: Sharding | None = None
        self._sync: ParameterSync | None = None
        self._consolidated: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public API

    def request_refresh(self) -> None:
        """Refresh every preconditioner at the next step, whatever the policy says."""
        self._refresh_requested = True

    def set_process_group(self, group: Any) -> None:
        """Shard over ``group`` (e.g. the data-parallel group, from a Lightning strategy's ``setup``).

        Collective: call on every rank of ``group``, before the first step (state loaded from a complete
        checkpoint is kept for the parameters this rank owns).
        """
        if self._sharding is not None and self._step:
            raise RuntimeError(
                "Shampoo.set_process_group() after sharded steps would lose the other ranks' state; call it "
                "before the first step."
            )
        self._process_group = group
        self._sharding_resolved = False
        self._sharding = self._sync = None
        self._resolve_sharding()

    @property
    def refresh_mode(self) -> str:
        """``"sync"``, ``"async"`` or ``"best_effort"``: the ``refresh`` option."""
        return self._engine.mode

    @property
    def refresh_lag(self) -> int:
        """Steps from a snapshot to the install of its roots (the bound on it for ``"best_effort"``)."""
        return self._engine.lag

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the complete state on rank ``to``, whose next :meth:`state_dict` (this step) returns it.

        Collective over the sharding group (call it on every rank), like ``ZeroRedundancyOptimizer``'s;
        Lightning calls it before saving. A no-op when the state is not sharded by parameter. For large
        models prefer the per-rank path of :mod:`lightning_shampoo.checkpoint`.
        """
        sharding = self._resolve_sharding()
        self._consolidated = None
        if sharding is not None:
            self._consolidated = distributed.gather_state_dicts(self._local_state_dict(), to, sharding)

    def metrics(self) -> dict[str, float]:
        """Plain floats for logging.

        ``nonfinite_skips``, ``refreshes`` (submitted), ``roots_accepted``, ``roots_rejected``,
        ``max_root_residual``, ``step``, and from the refresh engine: ``installs``, ``in_flight``
        (submitted, not yet installed), ``refresh_latency_s`` / ``refresh_latency_mean_s`` (snapshot →
        roots ready, last / mean over installs), ``staleness`` / ``staleness_mean`` (steps from snapshot to
        use), ``wait_s`` (total seconds ``step()`` was blocked on root computation).
        """
        out = {name: float(value) for name, value in self._counters.items()}
        out["max_root_residual"] = self._max_residual
        out["step"] = float(self._step)
        out.update(self._engine.metrics())
        return out

    def drain(self) -> None:
        """Block until every in-flight refresh is computed (e.g. before a checkpoint, which then holds the
        results); re-raises a failure of the background worker."""
        self._engine.drain()

    def close(self) -> None:
        """Stop the background refresh worker, if any (idempotent).

        Pending refreshes are kept: stepping again restarts the worker, which computes the unfinished ones,
        and the trajectory is unchanged. Called on leaving ``with Shampoo(...) as opt:``; the worker also
        stops when the optimizer is garbage-collected and at interpreter exit.
        """
        self._engine.close()

    def __enter__(self) -> Shampoo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        # A background failure surfaces here, before this step changes anything.
        self._engine.raise_if_failed()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._resolve_sharding()
        entries = self._entries_with_grad()
        if not entries:
            return loss
        self._step += 1
        self._consolidated = None
        step = self._step
        # Sharded: this rank's parameters only; the others arrive with the collective at the end.
        entries = [entry for entry in entries if self._owns(entry.index)]
        finite = self._finite_flags(entries)
        refresh = self._refresh_requested or self.policy.due(step)
        self._refresh_requested = False
        # A non-finite gradient skips its parameter's update; its factors are still refreshed.
        updating = _by_group([entry for entry, ok in zip(entries, finite, strict=True) if ok])
        for group, members in updating:
            self._accumulate(group, members, step)
        snapshots: list[FactorSnapshot] = []
        if refresh:
            for entry in entries:
                snapshots.extend(self._snapshot(entry.index, entry.group, entry.param))
        if snapshots:
            self._counters["refreshes"] += 1
            self._engine.submit(step, snapshots)
        installs = self._engine.due(step)
        if installs:
            params = [param for _, _, param in self._indexed_params()]
            for snapshot, result in installs:
                self._install(params[snapshot.param_index], snapshot, result)
        for group, members in updating:
            self._apply_updates(group, members)
        if self._sync is not None:
            self._sync()
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
            if self._owns(index) and not self.state[param]:
                self._init_state(group, param)
            entries.append(_Entry(index, group, position, param, grad))
        return entries

    def _indexed_params(self) -> Iterable[tuple[dict[str, Any], int, Tensor]]:
        for group in self.param_groups:
            for position, param in enumerate(group["params"]):
                yield group, position, param

    def _resolve_sharding(self) -> Sharding | None:
        """Decide, once, which parameters this rank owns (collective the first time); drop others' state."""
        if not self._sharding_resolved:
            indexed = list(self._indexed_params())
            params = [param for _, _, param in indexed]
            self._sharding = distributed.shard_parameters(
                self._distribute,
                self._process_group,
                params,
                [_name(group, position, param) for group, position, param in indexed],
                [
                    distributed.parameter_cost(self._plan(group, param), self._precondition_frequency)
                    for group, _, param in indexed
                ],
            )
            self._sharding_resolved = True
            if self._sharding is not None:
                self._sync = ParameterSync(params, self._sharding)
                for index, param in enumerate(params):
                    if not self._owns(index):
                        self.state.pop(param, None)
        return self._sharding

    def _owns(self, index: int) -> bool:
        """Whether this rank keeps the state of parameter ``index`` (all of them until sharding is known)."""
        return self._sharding is None or self._sharding.owns(index)

    def _finite_flags(self, entries: list[_Entry]) -> list[bool]:
        if not self.check_finite:
            return [True] * len(entries)
        # One fused pass over the gradients (max |g| is non-finite iff some entry is) and one host sync for
        # all parameters, like the AMP grad scaler's found-inf check.
        checked = [entry for entry in entries if local(entry.grad).numel()]
        flags = {}
        if checked:
            max_abs = torch._foreach_norm([local(entry.grad) for entry in checked], float("inf"))
            device = max_abs[0].device
            finite = torch.stack([m.to(device) for m in max_abs]).isfinite().tolist()
            flags = {entry.index: ok for entry, ok in zip(checked, finite, strict=True)}
        if any(distributed.is_dtensor(entry.param) for entry in entries):
            # The shards of a parameter must skip or apply a step together: their step counts must agree.
            agreed = distributed.agree([flags.get(e.index, True) for e in entries], self._process_group)
            flags = {entry.index: ok for entry, ok in zip(entries, agreed, strict=True)}
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
                        stacklevel=_caller_stacklevel(),
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
            factor = torch.zeros(shape, dtype=torch.float32, device=param.device)
            state[f"factor_{name}"] = distributed.block_state(param, factor)
            eye = torch.eye(d, dtype=torch.float32, device=param.device)
            state[f"root_{name}"] = distributed.block_state(param, eye.expand(n, d, d).clone())
        state["preconditioned"] = False

    def _plan(self, group: dict[str, Any], param: Tensor) -> BlockPlan:
        plan = self._plans.get(param)
        if plan is None:
            plan = distributed.plan_local_blocks(
                param,
                lambda shape: plan_blocks(
                    shape, group["block_size"], group["max_preconditioned_dim"], group["precondition_1d"]
                ),
            )
            self._plans[param] = plan
        return plan

    def _accumulate(self, group: dict[str, Any], entries: list[_Entry], step: int) -> None:
        """Phases 1 and 2 for a group's parameters: moments and the graft's second moment (batched over
        the parameters), and the factors' statistics (batched over each parameter's blocks)."""
        states = [self.state[entry.param] for entry in entries]
        for state in states:
            state["step"] += 1
        grads32 = [local(entry.grad).float() for entry in entries]
        beta1, beta2 = group["betas"]
        torch._foreach_lerp_([local(state["exp_avg"]) for state in states], grads32, 1.0 - beta1)
        second_moments = _graft_second_moments(group, states)
        if second_moments is not None:
            grafting.update_second_moments(group["graft"], second_moments, grads32, group["graft_beta2"])
        if step % self.statistics_frequency:
            return
        for entry, state, grad32 in zip(entries, states, grads32, strict=True):
            plan = self._plan(group, entry.param)
            for g, stack in enumerate(plan.split(grad32) if plan.preconditioned else []):
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
                            matrices=self._engine.capture(local(state[f"factor_{g}_{i}"])),
                            exponent=exponent,
                            epsilon=group["epsilon"],
                            relative_epsilon=group["relative_epsilon"],
                        )
                    )
        return snapshots

    def _install(self, param: Tensor, snapshot: FactorSnapshot, result: RootResult) -> None:
        """Install accepted roots; a rejected root keeps the previous one."""
        if not self._owns(snapshot.param_index):  # loaded from a checkpoint before the sharding was known
            return
        state = self.state[param]
        root = local(state[f"root_{snapshot.name}"])
        # Background results are in (pinned) host memory: non-blocking copies, counts without a device sync.
        new_root = result.root.to(root.device, root.dtype, non_blocking=True)
        n_accepted = int(result.accepted.sum())
        if n_accepted == result.accepted.numel():
            # The usual case, on the install step's critical path: one copy, no temporary.
            root.copy_(new_root)
        elif n_accepted:
            accepted = result.accepted.to(root.device, non_blocking=True)
            root.copy_(torch.where(accepted.view(-1, 1, 1), new_root, root))
        state["preconditioned"] = True
        self._counters["roots_accepted"] += n_accepted
        self._counters["roots_rejected"] += result.accepted.numel() - n_accepted
        finite = result.residual[result.residual.isfinite()]
        if finite.numel():
            self._max_residual = max(self._max_residual, float(finite.max()))

    def _apply_updates(self, group: dict[str, Any], entries: list[_Entry]) -> None:
        """Phase 4 for a group's parameters: direction, grafting, decoupled weight decay, parameter step."""
        states = [self.state[entry.param] for entry in entries]
        steps = [state["step"] for state in states]
        beta1 = group["betas"][0]
        momenta_hat = torch._foreach_div(
            [local(state["exp_avg"]) for state in states], [1.0 - beta1**step for step in steps]
        )
        diagonals = grafting.diagonal_updates(
            group["graft"],
            momenta_hat,
            _graft_second_moments(group, states),
            steps,
            group["graft_beta2"],
            group["graft_epsilon"],
        )
        updates = self._updates(group, entries, states, momenta_hat, diagonals)
        weights = [local(entry.param) for entry in entries]
        if group["weight_decay"]:
            torch._foreach_mul_(weights, 1.0 - group["lr"] * group["weight_decay"])
        updates = [update.to(weight.dtype) for update, weight in zip(updates, weights, strict=True)]
        torch._foreach_add_(weights, updates, alpha=-group["lr"])

    def _updates(
        self,
        group: dict[str, Any],
        entries: list[_Entry],
        states: list[dict[str, Any]],
        momenta_hat: list[Tensor],
        diagonals: list[Tensor],
    ) -> list[Tensor]:
        """Every parameter's update: Shampoo's direction grafted onto its diagonal update, or the diagonal
        update alone until the parameter's first roots are installed."""
        plans = [self._plan(group, entry.param) for entry in entries]
        # Per preconditioned parameter, its blocks' directions, one stack per block group.
        directions = {
            i: [
                precondition(stack, _group_tensors(state, "root", g, plans[i]))
                for g, stack in enumerate(plans[i].split(momenta_hat[i]))
            ]
            for i, state in enumerate(states)
            if plans[i].preconditioned and state["preconditioned"]
        }
        if directions and group["graft"] != "none":
            # All stacks of the group grafted together, then handed back in order.
            flat = [stack for stacks in directions.values() for stack in stacks]
            flat_diagonals = [stack for i in directions for stack in plans[i].split(diagonals[i])]
            grafted = iter(grafting.graft_norms(flat, flat_diagonals))
            directions = {i: [next(grafted) for _ in stacks] for i, stacks in directions.items()}
        return [
            plans[i].merge(directions[i]) if i in directions else diagonal
            for i, diagonal in enumerate(diagonals)
        ]

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The state keyed by parameter (and block), never by rank; sharded, this rank's parameters only
        (marked, so that loading it alone fails), or all of them after :meth:`consolidate_state_dict`."""
        if self._consolidated is not None:
            return self._consolidated
        return self._local_state_dict()

    def _local_state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["shampoo"] = {
            "step": self._step,
            "refresh_requested": self._refresh_requested,
            "counters": dict(self._counters),
            "max_root_residual": self._max_residual,
            "engine": self._engine.state_dict(),
        }
        if self._sharding is not None:
            state["shampoo"]["shard"] = {"rank": self._sharding.rank, "owners": list(self._sharding.owners)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = self._check_compatible(state_dict)
        state_dict = self._owned_part(state_dict)
        self._consolidated = None
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

    def _owned_part(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Sharded: the part of a (checked) checkpoint this rank keeps: its parameters and their refreshes."""
        if self._sharding is None:
            return state_dict
        keys = [key for group in state_dict["param_groups"] for key in group["params"]]
        owned = {key for index, key in enumerate(keys) if self._owns(index)}
        extra = dict(state_dict.get("shampoo", {}))
        if "engine" in extra:
            entries = distributed.pending_entries(extra["engine"])
            extra["engine"] = distributed.pending_state(
                [e for e in entries if self._owns(e["snapshot"]["param_index"])]
            )
        return {
            **state_dict,
            "state": {key: value for key, value in state_dict["state"].items() if key in owned},
            "shampoo": extra,
        }

    def _check_compatible(self, state_dict: dict[str, Any]) -> list[tuple[Tensor, dict[str, Any]]]:
        """Pair saved state with the parameters this rank keeps, refusing any mismatch before anything is
        loaded."""
        saved_groups = state_dict["param_groups"]
        shard = state_dict.get("shampoo", {}).get("shard")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Shampoo checkpoint has {len(saved_groups)} parameter groups, the optimizer has "
                f"{len(self.param_groups)}: build the optimizer with the same groups as the saved run."
            )
        pairs = []
        index = -1
        for saved_group, group in zip(saved_groups, self.param_groups, strict=True):
            if len(saved_group["params"]) != len(group["params"]):
                raise ValueError(
                    f"Shampoo checkpoint group has {len(saved_group['params'])} parameters, the optimizer's "
                    f"has {len(group['params'])}: build the optimizer over the same parameters."
                )
            for position, (key, param) in enumerate(zip(saved_group["params"], group["params"], strict=True)):
                index += 1
                if not self._owns(index):
                    continue
                saved_state = state_dict["state"].get(key)
                if saved_state:
                    self._check_param_state(group, saved_group, position, param, saved_state)
                    pairs.append((param, saved_state))
                elif shard is not None and shard["owners"][index] != shard["rank"]:
                    raise ValueError(
                        f"Shampoo checkpoint lacks the state of {_name(group, position, param)}: it holds "
                        f"only rank {shard['rank']}'s share of a sharded optimizer, and the parameter was "
                        f"rank {shard['owners'][index]}'s. Save after consolidate_state_dict() on every rank "
                        "(Lightning calls it), or use the per-rank files of lightning_shampoo.checkpoint."
                    )
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
            stored = distributed.block_state_shape(param, shape)
            expected[f"factor_{factor}"] = expected[f"root_{factor}"] = stored
        for key, shape in expected.items():
            value = saved_state.get(key)
            found = tuple(value.shape) if isinstance(value, Tensor) else "missing"
            if found != shape:
                raise ValueError(
                    f"Shampoo checkpoint does not match {name}: state {key!r} has shape {found}, expected "
                    f"{shape}. Was it saved for another model?"
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


def _graft_second_moments(group: dict[str, Any], states: list[dict[str, Any]]) -> list[Tensor] | None:
    """The graft's second moments of a group's parameters; ``None`` for a graft without one."""
    if not grafting.has_second_moment(group["graft"]):
        return None
    return [local(state["graft_sq"]) for state in states]


def _by_group(entries: list[_Entry]) -> list[tuple[dict[str, Any], list[_Entry]]]:
    """The entries of each param group, in order: the unit the batched (foreach) phases work on."""
    groups: dict[int, tuple[dict[str, Any], list[_Entry]]] = {}
    for entry in entries:
        groups.setdefault(id(entry.group), (entry.group, []))[1].append(entry)
    return list(groups.values())


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
        local(state[f"{kind}_{g}_{i}"]) if keep else None
        for i, keep in enumerate(plan.groups[g].preconditioned)
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
