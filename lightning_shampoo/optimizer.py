"""The :class:`Shampoo` optimizer: one step through statistics, refresh, moments and update.

``step()`` reads top-down: the layout (:mod:`.layout`) says which parameters this rank computes and gives
their plain local tensors; the phases run on those — the Kronecker statistics (:mod:`.kronecker`), the
refresh (:mod:`.refresh`: snapshot, compute, install), the preconditioner's moments and update
(:mod:`.preconditioners`) — and the layout's collective ends the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from . import guards, loading, statedict
from .blocking import BlockPlan, plan_for_group
from .cost import Work, parameter_work
from .kronecker import rounding_generator, update_statistics
from .layout import Layout, ShardLocal, choose_layout, is_dtensor
from .options import parse_arguments, require, validate_group
from .policies import RefreshPolicy
from .preconditioners import PRECONDITIONERS, group_tensors
from .refresh import RefreshEngine
from .requests import RefreshSettings


class _Entry(NamedTuple):
    """A parameter with a gradient (``index``: its position over all groups), ``weight`` and ``grad`` its
    plain local tensors, ``plan`` its blocks (looked up once a step)."""

    index: int
    group: dict[str, Any]
    position: int
    param: Tensor
    weight: Tensor
    grad: Tensor
    plan: BlockPlan


class Shampoo(Optimizer):
    r"""Shampoo with grafting, blocking and delayed preconditioner refreshes (Anil et al., 2020).

    Per block with gradient ``G`` and Kronecker factors ``S_i`` (one per preconditioned dim):

    .. math::
        S_i ← β_2 S_i + (1−β_2) G_{(i)} G_{(i)}^⊤,\quad P_i = (S_i + ε_i I)^{−1/p},\quad
        D = \hat M ×_1 P_1 ⋯ ×_k P_k,\quad U = D ‖A‖/‖D‖,\quad W ← W(1 − η λ) − η U

    with ``M̂`` the bias-corrected first moment, ``A`` the graft's (diagonal method's) update and
    ``p = 2k / exponent_multiplier``. With ``preconditioner="eigenvalue_corrected"`` refreshes compute the
    factors' eigenbases and the step runs Adam in them (:mod:`lightning_shampoo.preconditioners`). A
    refresh result that fails its checks keeps the previous one.

    Args:
        params: parameters or parameter groups (named parameters are used in messages).
        lr: learning rate η.
        betas: ``(β1, β2)``: momentum and the factors' EMA (``β2 = 1``: plain running sum).
        epsilon: ridge ε before the root (times ``λmax(S_i)`` if ``relative_epsilon``); the threshold of
            dropped eigenvalues with ``pseudo_inverse``.
        weight_decay: decoupled weight decay λ.
        block_size: largest factor dimension; larger dims are split into blocks.
        precondition_frequency: steps between refreshes.
        start_preconditioning_step: first step that refreshes (steps count from 1).
        graft: diagonal method giving the step size: adam, adagrad, rmsprop, sgd or none.
        graft_beta2, graft_epsilon: β and ε of the diagonal method (the graft, or Adam in the eigenbasis).
        exponent_override: root order p for every block.
        relative_epsilon: scale ``epsilon`` by the factor's largest eigenvalue.
        inverse_root: ``"eigh"`` or ``"newton"`` (coupled Newton iteration).
        preconditioner: ``"root_inverse"`` (Shampoo) or ``"eigenvalue_corrected"`` (EShampoo / SOAP).
        exponent_multiplier: root exponent ``−exponent_multiplier/(2k)`` (2: −1/2 for a matrix's factors).
        pseudo_inverse: invert eigenvalues at or below ε as 0 instead of adding a ridge (eigh only).
        statistics_frequency: update the factors every this many steps (cheaper steps).
        max_preconditioned_dim: dims larger than this keep an identity factor (e.g. vocabularies).
        precondition_1d: give order-1 parameters (biases, norms) a factor; else the diagonal method only.
        max_factor_ratio: a dim of size d in blocks of n entries gets a factor only if ``d² ≤ ratio·n`` (and
            small dims merge only under that bound): no factor far larger than its block (None: all dims).
        max_root_residual: reject a root whose residual check exceeds this.
        eigh_dtype: precision of the refresh's eigendecompositions: float32, each checked and recomputed
            in float64 where it fails, or float64 (:mod:`.eigen`); None: float32 where the refresh runs on
            the CPU (about 2× cheaper there), float64 on CUDA (faster there).
        basis_tolerance: an eigenbasis whose off-diagonal mass ``‖QᵀSQ − diag‖/‖S‖`` at a refresh is within
            this is kept, else recomputed (0: recomputed every refresh).
        factor_dtype: float32, or bfloat16: about half the memory (:class:`.preconditioners.Preconditioner`).
        matmul_dtype: dtype of the per-step products with roots or bases (None: float32 for roots, the
            bases' own); bfloat16 runs them on bfloat16 units (AMX, tensor cores), lossy for roots.
        refresh: ``"sync"`` (inside ``step()``), ``"async"`` (a background CPU thread; installed exactly
            ``refresh_lag`` steps after the snapshot: bitwise ``"sync"`` with the same lag) or
            ``"best_effort"`` (installed when ready, at most ``refresh_lag`` steps late). See :mod:`.refresh`.
        refresh_lag: snapshot → install, in steps; default 0 for ``"sync"``, else ``precondition_frequency``.
            A parameter's first results install at once, whatever the lag.
        refresh_policy: a :class:`RefreshPolicy` or a function ``step -> bool``; default :class:`EveryNSteps`.
        refresh_threads: CPU threads of the refresh, in every mode, each decomposing whole matrices (same bits
            for any count); default: torch's count, a background worker only the cores CPU training leaves.
        check_finite: skip parameters whose gradient is non-finite or would overflow (a host sync a step).
        distribute: ``"sharded"``: with replicated parameters on several ranks (DDP) each parameter has one
            owner rank keeping its state and computing its update (one all-gather a step); ``"replicated"``:
            every rank does all. DTensor (FSDP2) parameters are preconditioned shard-locally (:mod:`.layout`).
        process_group: the data-parallel group; default: the default group, if initialized at the first step.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        epsilon: float = 1e-6,
        weight_decay: float = 0.0,
        block_size: int = 1024,
        precondition_frequency: int = 10,
        start_preconditioning_step: int = 10,
        graft: str = "adam",
        graft_beta2: float = 0.999,
        graft_epsilon: float = 1e-8,
        exponent_override: int | None = None,
        relative_epsilon: bool = True,
        inverse_root: str = "eigh",
        *,
        preconditioner: str = "root_inverse",
        exponent_multiplier: float = 2.0,
        pseudo_inverse: bool = False,
        statistics_frequency: int = 1,
        max_preconditioned_dim: int | None = None,
        precondition_1d: bool = True,
        max_factor_ratio: float | None = 16.0,
        max_root_residual: float = 0.1,
        eigh_dtype: torch.dtype | None = None,
        basis_tolerance: float = 0.01,
        factor_dtype: torch.dtype = torch.float32,
        matmul_dtype: torch.dtype | None = None,
        refresh: str = "sync",
        refresh_lag: int | None = None,
        refresh_policy: RefreshPolicy | Callable[[int], bool] | None = None,
        refresh_threads: int | None = None,
        check_finite: bool = True,
        distribute: str = "sharded",
        process_group: Any = None,
    ) -> None:
        arguments = {
            name: value for name, value in locals().items() if name not in ("self", "params", "__class__")
        }
        defaults, self.options, self.refresh_options = parse_arguments(arguments)
        super().__init__(params, defaults)
        self._preconditioner = PRECONDITIONERS[preconditioner](factor_dtype, matmul_dtype)
        self._engine = self._new_engine()
        self._policy = self.refresh_options.policy
        self._progress = statedict.Progress()
        self._plans: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weak: a swapped-out parameter's goes too
        self._warnings = guards.Warnings()
        self._process_group = process_group
        self._layout: Layout | None = None
        self._loaded_whole = False  # the state was loaded before the layout was known: it is complete
        self._consolidated: tuple[int, dict[str, Any]] | None = None  # (step, the state dict to hand out)

    # ------------------------------------------------------------------ public API

    @property
    def layout(self) -> Layout:
        """Where the work and state live across ranks (decided at first use, and again if the parameters
        were swapped since: a collective when sharded)."""
        params = self._params()
        if self._layout is None or not self._layout.bound_to(params):
            loading.check_owners(self.state, params)
            loaded = self.shard_state_dict() if self._loaded_whole else None
            layout = self._layout = choose_layout(
                self.options.distribute, self._process_group, params, self._names(), self._work()
            )
            self._plans.clear()
            if loaded is not None and layout.shard_info() is not None:
                self.load_state_dict(loaded)  # kept where this rank owns it (cut where split by blocks)
                self._layout = layout  # torch's load_state_dict runs __setstate__, which forgets it
        return self._layout

    @property
    def policy(self) -> RefreshPolicy:
        """The refresh schedule in force (see :meth:`set_refresh_policy`)."""
        return self._policy

    def set_refresh_policy(self, policy: RefreshPolicy) -> None:
        """Replace the refresh schedule (e.g. by :class:`~lightning_shampoo.callbacks.ShampooCallback`)."""
        require(isinstance(policy, RefreshPolicy), f"expected a RefreshPolicy, got {policy!r}")
        self._policy = policy

    def request_refresh(self) -> None:
        """Refresh every preconditioner at the next step, whatever the policy says."""
        self._progress.refresh_requested = True

    def set_process_group(self, group: Any) -> None:
        """Use ``group`` as the data-parallel group (e.g. from a Lightning strategy's ``setup``). Collective:
        call on every rank, before the first step (loaded state is kept for the parameters this rank owns)."""
        if self._progress.step and self._layout is not None and self._layout.shard_info() is not None:
            raise RuntimeError(
                "Shampoo.set_process_group() after sharded steps would lose the other ranks' state; call it "
                "before the first step."
            )
        self._process_group, self._layout = group, None
        _ = self.layout

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (e.g. unfrozen layers); where the state is sharded, its parameters get owners too
        (collective then: call on every rank, as DDP training does)."""
        super().add_param_group(param_group)
        validate_group(self.param_groups[-1], self.options.inverse_root)
        if getattr(self, "_layout", None) is not None:
            self._layout = self._layout.extend(self._params(), self._names(), self._work())

    def metrics(self) -> dict[str, float]:
        """Plain floats for logging: ``nonfinite_skips`` (skipped parameter updates), ``refreshes``
        (submitted), ``roots_accepted`` / ``roots_rejected`` (matrices: roots or bases),
        ``rejected_refreshes`` (all of a refresh rejected), ``max_root_residual``, ``step``, and the
        engine's ``installs``, ``in_flight``, ``refresh_latency_s`` / ``_mean_s`` (snapshot → ready),
        ``staleness`` / ``_mean`` (snapshot → use, in steps), ``wait_s`` (seconds waited for refreshes)."""
        return {**self._progress.metrics(), **self._engine.metrics()}

    def drain(self) -> None:
        """Block until every in-flight refresh is computed (a checkpoint then holds results); re-raises a
        failed computation."""
        self._engine.drain()

    def close(self, wait: bool = True) -> None:
        """Stop the background refresh worker, if any (idempotent; ``wait``: for the refresh it computes).
        Pending refreshes stay: stepping again restarts it on the same trajectory. Leaving
        ``with Shampoo(...) as opt:`` calls it; garbage collection and interpreter exit never wait."""
        self._engine.close(wait)

    def __enter__(self) -> Shampoo:
        return self

    def __exit__(self, *exc: object) -> None:  # the worker stops; pending refreshes stay (see close)
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
        layout = self.layout  # checked once a step; the helpers below take it
        entries = self._entries_with_grad(layout)
        if not entries:
            return loss
        # Where sharded, this rank's parameters only; the others arrive with the layout's collective.
        entries = [entry for entry in entries if layout.owns(entry.index)]
        step = self._progress.step = self._progress.step + 1
        updating = [entry for entry, ok in zip(entries, self._usable(entries, layout), strict=True) if ok]
        for entry in updating:
            self.state[entry.param]["step"] += 1
        grads = {entry.index: layout.part(entry.param, entry.grad).float() for entry in updating}
        if step % self.options.statistics_frequency == 0:
            factor_dtype = self._preconditioner.state_dtype("factor_")
            for entry in updating:
                plan, state = entry.plan, self.state[entry.param]
                rounding = rounding_generator(factor_dtype, step, entry.index, entry.grad.device)
                for g, stack in enumerate(plan.split(grads[entry.index]) if plan.preconditioned else []):
                    factors = group_tensors(state, "factor", g, plan)
                    update_statistics(factors, stack, entry.group["betas"][1], rounding)
        if self._progress.refresh_requested or self._policy.due(step):
            self._progress.refresh_requested = False
            self._submit(step, entries)
        self._install(self._engine.due(step))
        for group, members in _by_group(updating):
            states = [self.state[entry.param] for entry in members]
            plans = [entry.plan for entry in members]
            self._preconditioner.accumulate(group, states, [grads[e.index] for e in members], plans)
            updates = self._preconditioner.updates(group, states, plans)
            weights = [entry.weight for entry in members]
            if group["weight_decay"]:
                torch._foreach_mul_(weights, 1.0 - group["lr"] * group["weight_decay"])
            updates = [update.to(weight.dtype) for update, weight in zip(updates, weights, strict=True)]
            torch._foreach_add_(weights, updates, alpha=-group["lr"])
        layout.after_step()
        return loss

    def _entries_with_grad(self, layout: Layout) -> list[_Entry]:
        entries = []
        for index, (group, position, param) in enumerate(self._indexed()):
            if param.grad is None:
                continue
            guards.check_supported(param, self._name(group, position, param))
            weight, plan = layout.weight(param), self._plan(group, param)
            if layout.owns(index) and not self.state[param]:
                self._preconditioner.init_state(self.state[param], weight, plan, group)
                loading.reserve(self.state[param])
            entries.append(_Entry(index, group, position, param, weight, layout.local(param.grad), plan))
        return entries

    def _usable(self, entries: list[_Entry], layout: Layout) -> list[bool]:
        """Per entry: whether its gradient can be used (agreed across the shards of a parameter)."""
        if not self.options.check_finite:
            return [True] * len(entries)
        bad = guards.unusable_gradients([entry.grad for entry in entries])
        ok = layout.agree([i not in bad for i in range(len(entries))])
        for i, (entry, usable) in enumerate(zip(entries, ok, strict=True)):
            if not usable:
                self._progress.counters["nonfinite_skips"] += 1
                name = self._name(entry.group, entry.position, entry.param)
                self._warnings.once(("skip", entry.index), guards.skip_message(name, bad.get(i, math.nan)))
        return ok

    def _submit(self, step: int, entries: list[_Entry]) -> None:
        # A parameter's first results install at once: until then it trains on the graft alone at a rate
        # meant for the preconditioner (a first install 10 steps late cost the 8k char-LM its target).
        by_lag: dict[int | None, list[Any]] = {0: [], None: []}  # None: the engine's lag
        for e in entries:
            state = self.state[e.param]
            snapshots = self._preconditioner.snapshot(e.index, state, e.plan, e.group, self._engine.capture)
            by_lag[None if state["preconditioned"] else 0].extend(snapshots)
        self._progress.counters["refreshes"] += any(by_lag.values())
        for lag, snapshots in by_lag.items():
            if snapshots:
                self._engine.submit(step, snapshots, lag)

    def _install(self, installs: list[Any]) -> None:
        """Install accepted results; a rejected one keeps the previous matrix. A parameter switches to its
        preconditioner only once one of its results is accepted."""
        if not installs:
            return
        indexed = list(self._indexed())
        accepted = rejected = 0
        for snapshot, result in installs:
            group, _, param = indexed[snapshot.param_index]
            state = self.state[param]
            count = self._preconditioner.install(state, self._plan(group, param), snapshot.name, result)
            state["preconditioned"] = bool(state["preconditioned"] or count)
            accepted, rejected = accepted + count, rejected + result.accepted.numel() - count
        residuals = torch.cat([result.residual.flatten() for _, result in installs])
        self._progress.record_install(accepted, rejected, residuals)
        if rejected and not accepted:
            self._warnings.once(("rejected", 0), guards.rejected_message(rejected))

    # ------------------------------------------------------------------ helpers

    def _indexed(self) -> Iterable[tuple[dict[str, Any], int, Tensor]]:
        for group in self.param_groups:
            for position, param in enumerate(group["params"]):
                yield group, position, param

    def _params(self) -> list[Tensor]:
        return [param for _, _, param in self._indexed()]

    def _work(self) -> list[Work]:
        """Each parameter's work per step (whole, and per block): what ownership balances."""
        frequency, kind = self.refresh_options.frequency, self.options.preconditioner
        return [
            parameter_work(plan_for_group(tuple(param.shape), group), frequency, kind)
            for group, _, param in self._indexed()
        ]

    def _plan(self, group: dict[str, Any], param: Tensor) -> BlockPlan:
        plan = self._plans.get(param)
        if plan is None:
            plan = self._plans[param] = self._known_layout().plan(param, partial(plan_for_group, group=group))
        return plan

    def _known_layout(self) -> Layout:
        """The layout if decided, else what is known without a collective: every rank keeps everything (a
        complete checkpoint loads whole; the first step then drops the state of others' parameters)."""
        if self._layout is not None and self._layout.bound_to(self._params()):
            return self._layout
        return ShardLocal(self._process_group) if any(is_dtensor(p) for p in self._params()) else Layout()

    def _names(self) -> list[str]:
        return [self._name(group, position, param) for group, position, param in self._indexed()]

    def _name(self, group: dict[str, Any], position: int, param: Tensor) -> str:
        names = group.get("param_names")
        if names:
            return f"parameter {names[position]!r} (shape {tuple(param.shape)})"
        return f"parameter {position} of its group (shape {tuple(param.shape)})"

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The complete state, keyed by parameter (and block), never by rank. Where it is sharded over
        ranks, call :meth:`consolidate_state_dict` on every rank first (Lightning and
        :func:`~lightning_shampoo.accelerate.prepare_shampoo` do): a share is never handed out silently."""
        if self._known_layout().shard_info() is None:
            return self.shard_state_dict()
        if self._consolidated is not None and self._consolidated[0] == self._progress.step:
            return self._consolidated[1]
        raise RuntimeError(
            "Shampoo's state is sharded over the data-parallel ranks, so this rank holds only its share: "
            "call optimizer.consolidate_state_dict() on every rank before state_dict() (Lightning does it; "
            "with Accelerate call lightning_shampoo.accelerate.prepare_shampoo(accelerator, optimizer) once "
            "after prepare), or save per rank with lightning_shampoo.checkpoint.sharded_state_dict."
        )  # fmt: skip

    def shard_state_dict(self) -> dict[str, Any]:
        """This rank's share of the state (all of it unless sharded; marked when it is a share)."""
        return self._saved()

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the complete state on rank ``to``, whose :meth:`state_dict` (this step) returns it; other
        ranks' return their share. Collective over the data-parallel group, like
        ``ZeroRedundancyOptimizer``'s (Lightning calls it before saving)."""
        self._consolidated = (self._progress.step, self._saved(gather_to=to))

    def _saved(self, gather_to: int | None = None) -> dict[str, Any]:
        """This rank's share, or the complete state gathered on rank ``gather_to``, in the saved form."""
        layout, params = self.layout if gather_to is not None else self._known_layout(), self._params()
        share = statedict.sectioned(
            super().state_dict(), self._progress, self._engine.state_dict(), self.options.preconditioner,
            layout.shard_info(),
        )  # fmt: skip
        share = (layout.gather(share, gather_to) or share) if gather_to is not None else share
        return statedict.pack(
            share, matrix=self._preconditioner.matrix, slots=statedict.slot_count(self.refresh_options),
            export=lambda index, value, **kind: layout.export(params[index], value, **kind),
        )  # fmt: skip

    def param_specs(self) -> list[loading.ParamSpec]:
        """What a checkpoint must hold for every parameter (saved shapes), in optimizer order."""
        specs, layout = [], self._known_layout()
        for index, (group, position, param) in enumerate(self._indexed()):
            plan, like = layout.saved_plan(param, partial(plan_for_group, group=group)), layout.local(param)
            shapes = {
                key: layout.saved_shape(param, shape) if statedict.is_block_key(key) else tuple(param.shape)
                for key, shape in self._preconditioner.state_shapes(like, plan, group).items()
            }
            specs.append(loading.ParamSpec(self._name(group, position, param), layout.owns(index), shapes))
        return specs

    def check_state_dict(self, state_dict: dict[str, Any], load_values: bool = True) -> None:
        """Raise ``ValueError`` if ``state_dict`` cannot be loaded (``load_values``: also check values)."""
        loading.validate(
            state_dict, self.param_groups, self.param_specs(), self.options.preconditioner, load_values
        )

    def fresh_state(self, index: int) -> dict[str, Any]:
        """The state a new parameter ``index`` starts with, as saved (e.g. a template to load into)."""
        group, _, param = list(self._indexed())[index]
        layout, state = self._known_layout(), {}
        plan = layout.saved_plan(param, partial(plan_for_group, group=group))
        self._preconditioner.init_state(state, layout.local(param), plan, group)
        return statedict.export_state(state, partial(layout.export, param))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load either form (see :mod:`.statedict`); validated whole before anything changes."""
        layout, dtype_of = self._known_layout(), self._preconditioner.state_dtype
        prepared = loading.prepare_load(
            state_dict, self.param_groups, self.param_specs(), self.options.preconditioner, layout.keep
        )  # this rank's parameters (and blocks)
        self._consolidated, self._loaded_whole = None, self._layout is None
        super().load_state_dict(part := prepared.part)
        keys = [key for group in part["param_groups"] for key in group["params"]]
        for param, saved in zip(self._params(), map(part["state"].get, keys), strict=True):
            if saved:
                loading.restore(self.state[param], saved, layout.import_, param.device, dtype_of)
        self._progress = prepared.progress
        self._engine.load_state_dict(statedict.map_tensors(prepared.engine, layout.import_))

    # ------------------------------------------------------------------ copies

    def __getstate__(self) -> dict[str, Any]:
        # The engine holds a thread and events: a copy carries its pending refreshes instead.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_engine", "_layout", "_plans")}
        state["_engine_state"] = self._engine.state_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        engine_state = state.pop("_engine_state", {"pending": []})
        super().__setstate__(state)
        self._engine = self._new_engine()
        self._engine.load_state_dict(engine_state)
        self._layout = None
        self._plans = WeakIdKeyDictionary()

    def _new_engine(self) -> RefreshEngine:
        options = self.options
        settings = RefreshSettings(
            options.inverse_root, options.max_root_residual, options.eigh_dtype, options.basis_tolerance
        )
        refresh = self.refresh_options
        return RefreshEngine(settings, refresh.mode, refresh.lag, refresh.threads)


def unwrap(optimizer: Any) -> Any:
    """The optimizer inside trainer wrappers (Lightning's ``LightningOptimizer`` and Accelerate's
    ``AcceleratedOptimizer`` both keep it in ``.optimizer``)."""
    while isinstance(getattr(optimizer, "optimizer", None), Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _by_group(entries: list[_Entry]) -> list[tuple[dict[str, Any], list[_Entry]]]:
    """The entries of each param group, in order: the unit the batched (foreach) phases work on."""
    groups: dict[int, tuple[dict[str, Any], list[_Entry]]] = {}
    for entry in entries:
        groups.setdefault(id(entry.group), (entry.group, []))[1].append(entry)
    return list(groups.values())
