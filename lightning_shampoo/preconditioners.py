"""The two preconditioners built on Shampoo's Kronecker factors ``S_i`` of every block.

**Root inverse** (Shampoo, Anil et al.): refresh ``P_i = (S_i + εI)^(−1/p)``; the direction of a block is
``D = M̂ ×₁ P₁ ⋯ ×ₖ Pₖ``, grafted to the diagonal method's step size ``U = D·‖A‖/‖D‖``. Until a parameter's
first accepted root its update is the graft's ``A``.

**Eigenvalue corrected** (EShampoo / SOAP, George et al. 2018, Vyas et al. 2024): refresh the eigenbases
``Q_i`` of the factors and run Adam in the rotated coordinates ``X' = X ×₁ Q₁ᵀ ⋯ ×ₖ Qₖᵀ``:
``M' ← β₁M' + (1−β₁)G'``, ``V' ← β₂V' + (1−β₂)G'²``, ``N' = M̂'/(√V̂' + ε)``, ``U = N' ×₁ Q₁ ⋯ ×ₖ Qₖ``.
The second moment tracks the factors' eigenvalues between refreshes (Shampoo's roots freeze them), so no
graft is needed (``graft="none"`` is its natural choice; another graft rescales ``U`` per block as above).
Both moments live in the rotated coordinates of the installed basis. When a refresh installs ``Q_new``,
they are re-projected with ``R_i = Q_newᵢᵀ Q_oldᵢ``: ``M' ← M' ×ᵢ Rᵢ`` (exact: ``M'`` is linear in the
gradients) and ``V' ← V' ×ᵢ (Rᵢ∘Rᵢ)`` (∘: elementwise square; exact when the gradients' covariance is
diagonal in the old basis, and a weighted average of the old entries either way, so the scale carries
over). Resetting ``V'`` instead would make every refresh a cold Adam start; keeping it unchanged would pair
old eigenvalues with new directions. Before the first basis, ``Q = I``: plain Adam.

The ``β₂`` and ``ε`` of the diagonal method are ``graft_beta2`` and ``graft_epsilon``: the graft's for the
root inverse, Adam's in the eigenbasis for the eigenvalue-corrected preconditioner.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import grafting, triangles
from .blocking import BlockPlan
from .kronecker import precondition
from .options import root_exponent
from .requests import BasisRequest, FactorSnapshot, Request, Result, RootRequest

State = dict[str, Any]


def factor_shapes(plan: BlockPlan) -> list[tuple[str, tuple[int, int, int]]]:
    """``(name, (n_blocks, d, d))`` for every factor of the plan, name ``"{group}_{dim}"``."""
    return [
        (f"{g}_{i}", (block_group.n_blocks, size, size))
        for g, block_group in enumerate(plan.groups)
        for i, (size, keep) in enumerate(
            zip(block_group.block_shape, block_group.preconditioned, strict=True)
        )
        if keep
    ]


def group_tensors(state: State, kind: str, g: int, plan: BlockPlan) -> list[Tensor | None]:
    """The ``kind`` ("factor", "root", "basis") stacks of block group ``g``, ``None`` for identity dims."""
    return [
        state[f"{kind}_{g}_{i}"] if keep else None for i, keep in enumerate(plan.groups[g].preconditioned)
    ]


def graft_second_moments(group: dict[str, Any], states: list[State]) -> list[Tensor] | None:
    """The graft's second moments of a group's parameters; ``None`` for a graft without one."""
    if not grafting.has_second_moment(group["graft"]):
        return None
    return [state["graft_sq"] for state in states]


def graft_onto(
    group: dict[str, Any],
    plans: list[BlockPlan],
    directions: dict[int, list[Tensor]],
    diagonals: list[Tensor],
) -> list[Tensor]:
    """Every parameter's update: its blocks' directions grafted to the diagonal update's norm per block
    (as they are for graft "none"), or the diagonal update where a parameter has no directions."""
    if directions and group["graft"] != "none":
        # All stacks of the group grafted together, then handed back in order.
        flat = [stack for stacks in directions.values() for stack in stacks]
        flat_diagonals = [stack for i in directions for stack in plans[i].split(diagonals[i])]
        grafted = iter(grafting.graft_norms(flat, flat_diagonals))
        directions = {i: [next(grafted) for _ in stacks] for i, stacks in directions.items()}
    return [
        plans[i].merge(directions[i]) if i in directions else diagonal for i, diagonal in enumerate(diagonals)
    ]


def _copy_accepted(target: Tensor, new: Tensor, accepted: Tensor) -> int:
    """Copy the accepted matrices of ``new`` into ``target`` (the others keep theirs); the count copied."""
    new = new.to(target.device, target.dtype, non_blocking=True)
    count = int(accepted.sum())
    if count == accepted.numel():
        # The usual case, on the install step's critical path: one copy, no temporary.
        target.copy_(new)
    elif count:
        per_block = accepted.to(target.device, non_blocking=True).view(-1, *(1,) * (target.dim() - 1))
        target.copy_(torch.where(per_block, new, target))
    return count


class Preconditioner:
    """What the two preconditioners share: a factor and a refreshed matrix (identity at first) per
    preconditioned dim of every block, and the install of accepted results.

    Storage: everything in float32 by default. With a 16-bit ``factor_dtype`` the refreshed matrices are
    kept in it; where they are symmetric (roots) both they and the factors are kept as upper triangles
    (:mod:`.triangles`), the factors in float32: the same bytes as full bfloat16 factors, without the
    rounding noise that drowns their small eigenvalues (on the benchmark tasks it cost 1.5–4.5× the steps;
    bfloat16 roots multiplied in float32 cost nothing measurable). Bases are not symmetric: their factors
    are bfloat16.
    """

    kind = ""
    matrix = ""  # state key prefix of the refreshed matrices
    # Roots: symmetric (they may be stored as triangles), and their products cancel terms up to their
    # eigenvalue spread larger than the result, which bfloat16 products do not survive: float32 products
    # unless matmul_dtype asks otherwise. Products with orthonormal bases run in the bases' dtype.
    roots = False

    def __init__(
        self, factor_dtype: torch.dtype = torch.float32, matmul_dtype: torch.dtype | None = None
    ) -> None:
        self.factor_dtype = factor_dtype
        self.matmul_dtype = matmul_dtype or (torch.float32 if self.roots else None)  # None: the bases' dtype
        self.packed = self.roots and factor_dtype != torch.float32

    def state_dtype(self, key: str) -> torch.dtype:
        """The dtype a state tensor is kept in: ``factor_dtype`` for the refreshed matrices and (unless
        packed) the factors, else fp32."""
        if key.startswith(f"{self.matrix}_") or (key.startswith("factor_") and not self.packed):
            return self.factor_dtype
        return torch.float32

    def _stored(self, matrices: Tensor, key: str) -> Tensor:
        """A fresh ``(n, d, d)`` stack as the state keeps ``key``: its triangles when packed."""
        matrices = matrices.to(self.state_dtype(key))
        return triangles.pack(matrices) if self.packed else matrices.clone()

    def moment_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The elementwise (parameter-shaped) state tensors."""
        raise NotImplementedError

    def init_state(self, state: State, like: Tensor, plan: BlockPlan, group: dict[str, Any]) -> None:
        """Fresh state for a parameter whose local tensor is ``like``."""
        state["step"] = 0
        for key in self.moment_keys(group):
            state[key] = torch.zeros_like(like, dtype=torch.float32, memory_format=torch.contiguous_format)
        for name, (n, d, _) in factor_shapes(plan):
            zeros = torch.zeros((n, d, d), device=like.device)
            state[f"factor_{name}"] = self._stored(zeros, "factor_")
            eye = torch.eye(d, device=like.device).expand(n, d, d)
            state[f"{self.matrix}_{name}"] = self._stored(eye, f"{self.matrix}_")
        state["preconditioned"] = False

    def state_shapes(
        self, like: Tensor, plan: BlockPlan, group: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        """Shape of every state tensor of a parameter (local)."""
        shapes = {key: tuple(like.shape) for key in self.moment_keys(group)}
        for name, (n, d, _) in factor_shapes(plan):
            shape = (n, triangles.size(d)) if self.packed else (n, d, d)
            shapes[f"factor_{name}"] = shapes[f"{self.matrix}_{name}"] = shape
        return shapes

    def snapshot(
        self, index: int, state: State, plan: BlockPlan, group: dict[str, Any], capture: Any
    ) -> list[FactorSnapshot]:
        """Copies of the parameter's factors (``capture``: the engine's copy function) with their requests."""
        snapshots = []
        for name, _ in factor_shapes(plan):
            block_group = plan.groups[int(name.split("_")[0])]
            snapshots.append(
                FactorSnapshot(
                    index,
                    name,
                    capture(state[f"factor_{name}"]),
                    self.request(group, block_group.order),
                    self.previous(state, name, capture),
                )
            )
        return snapshots

    def request(self, group: dict[str, Any], order: int) -> Request:
        raise NotImplementedError

    def previous(self, state: State, name: str, capture: Any) -> Tensor | None:
        return None

    def install(self, state: State, plan: BlockPlan, name: str, result: Result) -> int:
        """Install the accepted matrices of one factor's result; the number accepted."""
        raise NotImplementedError

    def accumulate(
        self, group: dict[str, Any], states: list[State], grads: list[Tensor], plans: list[BlockPlan]
    ) -> None:
        """The moments' update with this step's (fp32, local) gradients, after any install."""
        raise NotImplementedError

    def updates(self, group: dict[str, Any], states: list[State], plans: list[BlockPlan]) -> list[Tensor]:
        """Every parameter's update ``U`` (the step is ``W ← W·(1 − lr·wd) − lr·U``)."""
        raise NotImplementedError


class RootInverse(Preconditioner):
    """Shampoo's inverse roots, grafted onto a diagonal method (see the module docstring)."""

    kind = "root_inverse"
    matrix = "root"
    roots = True

    def moment_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "graft_sq") if grafting.has_second_moment(group["graft"]) else ("exp_avg",)

    def request(self, group: dict[str, Any], order: int) -> Request:
        return RootRequest(
            root_exponent(group, order), group["epsilon"], group["relative_epsilon"], group["pseudo_inverse"]
        )

    def install(self, state: State, plan: BlockPlan, name: str, result: Result) -> int:
        return _copy_accepted(state[f"root_{name}"], result.root, result.accepted)

    def accumulate(
        self, group: dict[str, Any], states: list[State], grads: list[Tensor], plans: list[BlockPlan]
    ) -> None:
        torch._foreach_lerp_([state["exp_avg"] for state in states], grads, 1.0 - group["betas"][0])
        second_moments = graft_second_moments(group, states)
        if second_moments is not None:
            grafting.update_second_moments(group["graft"], second_moments, grads, group["graft_beta2"])

    def updates(self, group: dict[str, Any], states: list[State], plans: list[BlockPlan]) -> list[Tensor]:
        steps = [state["step"] for state in states]
        beta1 = group["betas"][0]
        momenta_hat = torch._foreach_div(
            [state["exp_avg"] for state in states], [1.0 - beta1**t for t in steps]
        )
        diagonals = grafting.diagonal_updates(
            group["graft"],
            momenta_hat,
            graft_second_moments(group, states),
            steps,
            group["graft_beta2"],
            group["graft_epsilon"],
        )
        directions = {
            i: [
                precondition(stack, group_tensors(state, "root", g, plans[i]), self.matmul_dtype)
                for g, stack in enumerate(plans[i].split(momenta_hat[i]))
            ]
            for i, state in enumerate(states)
            if plans[i].preconditioned and state["preconditioned"]
        }
        return graft_onto(group, plans, directions, diagonals)


class EigenvalueCorrected(Preconditioner):
    """Adam in the eigenbasis of Shampoo's factors (EShampoo / SOAP; see the module docstring)."""

    kind = "eigenvalue_corrected"
    matrix = "basis"

    def moment_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        graft = ("graft_sq",) if grafting.has_second_moment(group["graft"]) else ()
        return ("exp_avg", "exp_avg_sq", *graft)

    def request(self, group: dict[str, Any], order: int) -> Request:
        return BasisRequest()

    def previous(self, state: State, name: str, capture: Any) -> Tensor | None:
        return capture(state[f"basis_{name}"])

    def install(self, state: State, plan: BlockPlan, name: str, result: Result) -> int:
        basis = state[f"basis_{name}"]
        new = result.basis.to(basis.device, torch.float32, non_blocking=True)
        accepted = result.accepted.to(basis.device, non_blocking=True).view(-1, 1, 1)
        g, dim = (int(part) for part in name.split("_"))
        # R = Q_newᵀ Q_old re-projects the moments into the new basis; exactly I where the basis stays.
        moved = accepted & ~result.kept.to(basis.device, non_blocking=True).view(-1, 1, 1)
        rotation = torch.where(moved, new.mT @ basis.float(), torch.eye(basis.shape[-1], device=basis.device))
        factors: list[Tensor | None] = [None] * len(plan.groups[g].block_shape)
        for key, matrix in (("exp_avg", rotation), ("exp_avg_sq", rotation.square())):
            stacks = plan.split(state[key])
            factors[dim] = matrix
            stacks[g] = precondition(stacks[g], factors)
            state[key].copy_(plan.merge(stacks))
        return _copy_accepted(basis, new, result.accepted)

    def accumulate(
        self, group: dict[str, Any], states: list[State], grads: list[Tensor], plans: list[BlockPlan]
    ) -> None:
        second_moments = graft_second_moments(group, states)
        if second_moments is not None:
            grafting.update_second_moments(group["graft"], second_moments, grads, group["graft_beta2"])
        rotated = [
            _rotate(state, plan, grad, into=True, dtype=self.matmul_dtype)
            for state, plan, grad in zip(states, plans, grads, strict=True)
        ]
        beta1, beta2 = group["betas"][0], group["graft_beta2"]
        torch._foreach_lerp_([state["exp_avg"] for state in states], rotated, 1.0 - beta1)
        squares = [state["exp_avg_sq"] for state in states]
        torch._foreach_mul_(squares, beta2)
        torch._foreach_addcmul_(squares, rotated, rotated, value=1.0 - beta2)

    def updates(self, group: dict[str, Any], states: list[State], plans: list[BlockPlan]) -> list[Tensor]:
        steps = [state["step"] for state in states]
        beta1 = group["betas"][0]
        momenta_hat = torch._foreach_div(
            [state["exp_avg"] for state in states], [1.0 - beta1**t for t in steps]
        )
        rotated_updates = grafting.diagonal_updates(
            "adam",
            momenta_hat,
            [state["exp_avg_sq"] for state in states],
            steps,
            group["graft_beta2"],
            group["graft_epsilon"],
        )
        updates = [
            _rotate(state, plan, u, into=False, dtype=self.matmul_dtype)
            for state, plan, u in zip(states, plans, rotated_updates, strict=True)
        ]
        if group["graft"] == "none":
            return updates
        momenta = [
            _rotate(state, plan, m, into=False, dtype=self.matmul_dtype)
            for state, plan, m in zip(states, plans, momenta_hat, strict=True)
        ]
        diagonals = grafting.diagonal_updates(
            group["graft"],
            momenta,
            graft_second_moments(group, states),
            steps,
            group["graft_beta2"],
            group["graft_epsilon"],
        )
        directions = {i: plans[i].split(updates[i]) for i in range(len(states)) if plans[i].preconditioned}
        return graft_onto(group, plans, directions, diagonals)


def _rotate(state: State, plan: BlockPlan, tensor: Tensor, into: bool, dtype: torch.dtype | None) -> Tensor:
    """``X ×₁ Q₁ᵀ ⋯ ×ₖ Qₖᵀ`` per block (``into`` the eigenbasis), or ``X ×₁ Q₁ ⋯ ×ₖ Qₖ`` (back), the
    products in ``dtype``."""
    if not plan.preconditioned:
        return tensor
    stacks = []
    for g, stack in enumerate(plan.split(tensor)):
        bases = group_tensors(state, "basis", g, plan)
        stacks.append(precondition(stack, [b.mT if into and b is not None else b for b in bases], dtype))
    return plan.merge(stacks)


PRECONDITIONERS: dict[str, type[Preconditioner]] = {
    cls.kind: cls for cls in (RootInverse, EigenvalueCorrected)
}
