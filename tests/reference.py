"""Plain-loop fp64 Shampoo, written from the update formulas alone, for equivalence tests.

Deliberately independent of ``lightning_shampoo``: no shared helpers, no batching, one Python loop
over parameters, blocks and dims. Per parameter, with steps t counted from 1:

* blocking: squeeze size-1 dims, merge adjacent dims left to right while the product stays
  ``<= block_size``, leave dims ``> max_preconditioned_dim`` whole and unpreconditioned, cut every
  other dim into ``block_size`` chunks; the blocks are the cells of that grid;
* statistics (when ``t % statistics_frequency == 0``): ``S_i ← β2·S_i + (1−β2)·G₍ᵢ₎G₍ᵢ₎ᵀ``
  (``S_i + G₍ᵢ₎G₍ᵢ₎ᵀ`` when β2 = 1);
* roots (when ``t ≥ start`` and ``(t − start) % precondition_frequency == 0``):
  ``P_i = (S_i + ε_i I)^(−1/p)`` by fp64 eigendecomposition, ``p = exponent_override or
  2k/exponent_multiplier``, ``ε_i = ε·λmax(S_i)`` if ``relative_epsilon`` else ``ε``; with
  ``pseudo_inverse`` no ridge, and eigenvalues ``≤ ε_i`` inverted as 0;
* momentum ``M ← β1·M + (1−β1)·G``, ``M̂ = M/(1 − β1ᵗ)``, direction ``D = M̂ ×₁ P₁ ⋯ ×ₖ Pₖ``;
* grafting per block ``U = D·‖A‖/‖D‖`` (``U = D`` for graft "none"), ``U = A`` before the first
  root computation or for blocks without preconditioned dims;
* ``W ← W·(1 − lr·wd) − lr·U``.

Eigenvalue-corrected (``preconditioner="eigenvalue_corrected"``), written the way the SOAP paper's code
keeps its moments: ``M`` in the original coordinates, rotated into the eigenbasis every step. At a refresh
``Q_i`` = the eigenvectors of ``S_i`` (fp64 eigh) and the rotated second moment is carried over as
``V' ← V' ×ᵢ (Rᵢ∘Rᵢ)``, ``Rᵢ = Q_newᵢᵀ Q_oldᵢ``; every step ``G' = G ×₁ Q₁ᵀ ⋯``,
``V' ← β·V' + (1−β)·G'²`` (β = graft_beta2), ``N' = (M̂ ×₁ Q₁ᵀ ⋯) / (√(V'/(1−βᵗ)) + ε_graft)``,
``D = N' ×₁ Q₁ ⋯``, grafted per block as above unless graft "none" (``Q = I`` before the first refresh).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

GRAFTS = ("adam", "adagrad", "rmsprop", "sgd", "none")


def reference_merged_shape(
    shape: Sequence[int], block_size: int, max_factor_ratio: float | None = None
) -> list[int]:
    """Squeeze size-1 dims, then merge adjacent dims greedily while the product stays ≤ block_size and,
    with a ratio r, while its square stays ≤ r times the parameter's size."""
    numel = 1
    for d in shape:
        numel *= d
    merged: list[int] = []
    for d in shape:
        if d == 1:
            continue
        fits = merged and merged[-1] * d <= block_size
        if fits and (max_factor_ratio is None or (merged[-1] * d) ** 2 <= max_factor_ratio * numel):
            merged[-1] *= d
        else:
            merged.append(d)
    return merged


@dataclass
class _Block:
    index: tuple[slice, ...]  # cell of the grid, indexing the merged-shape view
    dims: list[int]  # block dims that carry a Kronecker factor
    exponent: float
    factors: list[Tensor] = field(default_factory=list)  # S_i, fp64
    roots: list[Tensor] = field(default_factory=list)  # P_i, fp64 (eigenvalue corrected: the bases Q_i)


def reference_blocks(
    shape: Sequence[int],
    block_size: int,
    max_preconditioned_dim: int | None,
    precondition_1d: bool,
    exponent_override: float | None,
    exponent_multiplier: float = 1.0,
    max_factor_ratio: float | None = None,
) -> tuple[list[int], list[tuple[tuple[slice, ...], list[int], float]]]:
    """Merged shape and, per grid cell, ``(index, preconditioned dims, root exponent p)``.

    With a ratio r a dim is preconditioned only if its full-size chunk ``c`` has ``c² ≤ r·(size of a
    full-size block)``, for every block of the parameter alike."""
    merged = reference_merged_shape(shape, block_size, max_factor_ratio)
    skipped = [max_preconditioned_dim is not None and d > max_preconditioned_dim for d in merged]
    if max_factor_ratio is not None:
        chunks = [d if skip else min(d, block_size) for d, skip in zip(merged, skipped, strict=True)]
        block = 1
        for c in chunks:
            block *= c
        skipped = [skip or c * c > max_factor_ratio * block for c, skip in zip(chunks, skipped, strict=True)]
    chunks = [
        [slice(0, d)] if skip else [slice(s, min(s + block_size, d)) for s in range(0, d, block_size)]
        for d, skip in zip(merged, skipped, strict=True)
    ]
    dims = [i for i, skip in enumerate(skipped) if not skip]
    if len(merged) == 1 and not precondition_1d:
        dims = []
    exponent = exponent_override if exponent_override is not None else 2 * len(dims) / exponent_multiplier
    return merged, [(index, dims, exponent) for index in itertools.product(*chunks)]


def _mode_product(x: Tensor, matrix: Tensor, dim: int) -> Tensor:
    """``x ×_dim matrix``: multiply every mode-``dim`` fibre of x by ``matrix``."""
    return torch.movedim(torch.tensordot(matrix, x, dims=([1], [dim])), 0, dim)


def _unfold(x: Tensor, dim: int) -> Tensor:
    """Mode-``dim`` unfolding: ``dim`` first, the rest flattened."""
    return torch.movedim(x, dim, 0).reshape(x.shape[dim], -1)


def _inverse_root(stat: Tensor, exponent: float, epsilon: float, relative: bool, pseudo: bool) -> Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(stat)
    ridge = epsilon * eigenvalues.max().item() if relative else epsilon
    if pseudo:
        inverted = [0.0 if lam <= ridge else lam ** (-1.0 / exponent) for lam in eigenvalues.tolist()]
        return eigenvectors @ torch.diag(torch.tensor(inverted, dtype=torch.float64)) @ eigenvectors.T
    return eigenvectors @ torch.diag((eigenvalues + ridge) ** (-1.0 / exponent)) @ eigenvectors.T


def _rotate(x: Tensor, block: _Block, back: bool) -> Tensor:
    """``x ×ᵢ Qᵢᵀ`` over the block's preconditioned dims (``back``: ``×ᵢ Qᵢ``)."""
    for dim, basis in zip(block.dims, block.roots, strict=True):
        x = _mode_product(x, basis if back else basis.T, dim)
    return x


class ReferenceShampoo:
    """fp64 Shampoo over copies of ``params``; ``step(grads)`` applies one update to ``self.params``."""

    def __init__(
        self,
        params: Sequence[Tensor],
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
        exponent_override: float | None = None,
        relative_epsilon: bool = True,
        statistics_frequency: int = 1,
        max_preconditioned_dim: int | None = None,
        precondition_1d: bool = True,
        max_factor_ratio: float | None = None,
        preconditioner: str = "root_inverse",
        exponent_multiplier: float = 1.0,
        pseudo_inverse: bool = False,
    ) -> None:
        if graft not in GRAFTS:
            raise ValueError(f"unknown graft {graft!r}")
        self.corrected = preconditioner == "eigenvalue_corrected"
        self.pseudo_inverse = pseudo_inverse
        self.lr, self.weight_decay = lr, weight_decay
        self.beta1, self.beta2 = betas
        self.epsilon, self.relative_epsilon = epsilon, relative_epsilon
        self.precondition_frequency = precondition_frequency
        self.start = start_preconditioning_step
        self.statistics_frequency = statistics_frequency
        self.graft, self.graft_beta2, self.graft_epsilon = graft, graft_beta2, graft_epsilon
        self.t = 0
        self.params = [p.detach().to(torch.float64).clone() for p in params]
        self.merged: list[list[int]] = []
        self.blocks: list[list[_Block]] = []
        for p in self.params:
            merged, cells = reference_blocks(
                p.shape,
                block_size,
                max_preconditioned_dim,
                precondition_1d,
                exponent_override,
                exponent_multiplier,
                max_factor_ratio,
            )
            blocks = []
            for index, dims, exponent in cells:
                sizes = [index[i].stop - index[i].start for i in dims]
                zeros = [torch.zeros(n, n, dtype=torch.float64) for n in sizes]
                eyes = [torch.eye(n, dtype=torch.float64) for n in sizes]
                blocks.append(_Block(index, dims, exponent, zeros, eyes))
            self.merged.append(merged)
            self.blocks.append(blocks)
        self.exp_avg = [torch.zeros(shape, dtype=torch.float64) for shape in self.merged]
        self.graft_sq = [torch.zeros(shape, dtype=torch.float64) for shape in self.merged]
        self.rotated_sq = [torch.zeros(shape, dtype=torch.float64) for shape in self.merged]  # V'
        self.preconditioned = False

    def _graft_direction(self, i: int, grad: Tensor, mhat: Tensor) -> Tensor:
        """Update A of the diagonal method (its second moment v is updated here, every step)."""
        v, b2 = self.graft_sq[i], self.graft_beta2
        if self.graft == "adam":
            v.mul_(b2).add_((1 - b2) * grad**2)
            return mhat / ((v / (1 - b2**self.t)).sqrt() + self.graft_epsilon)
        if self.graft == "rmsprop":
            v.mul_(b2).add_((1 - b2) * grad**2)
            return mhat / (v.sqrt() + self.graft_epsilon)
        if self.graft == "adagrad":
            v.add_(grad**2)
            return mhat / (v.sqrt() + self.graft_epsilon)
        return mhat  # sgd; "none" uses M̂ until the first root

    def step(self, grads: Sequence[Tensor]) -> None:
        self.t += 1
        t = self.t
        update_stats = t % self.statistics_frequency == 0
        refresh = t >= self.start and (t - self.start) % self.precondition_frequency == 0
        self.preconditioned = self.preconditioned or refresh
        for i, (param, raw_grad) in enumerate(zip(self.params, grads, strict=True)):
            grad = raw_grad.to(torch.float64).reshape(self.merged[i])
            m = self.exp_avg[i].mul_(self.beta1).add_((1 - self.beta1) * grad)
            mhat = m / (1 - self.beta1**t)
            graft = self._graft_direction(i, grad, mhat)
            update = torch.empty_like(mhat)
            for block in self.blocks[i]:
                g = grad[block.index]
                for k, dim in enumerate(block.dims):
                    if update_stats:
                        outer = _unfold(g, dim) @ _unfold(g, dim).T
                        if self.beta2 == 1:  # plain AdaGrad-style sum
                            block.factors[k] = block.factors[k] + outer
                        else:
                            block.factors[k] = self.beta2 * block.factors[k] + (1 - self.beta2) * outer
                    if refresh and not self.corrected:
                        block.roots[k] = _inverse_root(
                            block.factors[k],
                            block.exponent,
                            self.epsilon,
                            self.relative_epsilon,
                            self.pseudo_inverse,
                        )
                if self.corrected:
                    direction = self._corrected_update(i, block, g, mhat[block.index], refresh)
                    if self.graft == "none":
                        update[block.index] = direction
                    elif not block.dims:
                        update[block.index] = graft[block.index]
                    else:
                        norm = direction.norm()
                        scale = graft[block.index].norm() / norm if norm > 0 else 0.0
                        update[block.index] = direction * scale
                    continue
                update[block.index] = self._block_update(block, mhat[block.index], graft[block.index])
            param.mul_(1 - self.lr * self.weight_decay).sub_(self.lr * update.reshape(param.shape))

    def _corrected_update(self, i: int, block: _Block, grad: Tensor, mhat: Tensor, refresh: bool) -> Tensor:
        """Adam in the block's eigenbasis; at a refresh the new bases come first, ``V'`` carried over."""
        v = self.rotated_sq[i][block.index]
        if refresh:
            for k, dim in enumerate(block.dims):
                basis = torch.linalg.eigh(block.factors[k])[1]
                v = _mode_product(v, (basis.T @ block.roots[k]) ** 2, dim)
                block.roots[k] = basis
        b2 = self.graft_beta2
        v = b2 * v + (1 - b2) * _rotate(grad, block, back=False) ** 2
        self.rotated_sq[i][block.index] = v
        rotated = _rotate(mhat, block, back=False) / ((v / (1 - b2**self.t)).sqrt() + self.graft_epsilon)
        return _rotate(rotated, block, back=True)

    def _block_update(self, block: _Block, mhat: Tensor, graft: Tensor) -> Tensor:
        if not self.preconditioned or not block.dims:
            return graft
        direction = mhat
        for dim, root in zip(block.dims, block.roots, strict=True):
            direction = _mode_product(direction, root, dim)
        if self.graft == "none":
            return direction
        norm = direction.norm()
        return direction * (graft.norm() / norm) if norm > 0 else torch.zeros_like(direction)
