"""The timed workloads: an MLP regression step and the char-LM recipe's transformer step.

A :class:`Workload` builds its model, a fixed pool of batches (random data: the timings do not depend
on what is learnt) and the loss, and knows how many tokens a step sees for the flop model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_shampoo.recipes import CharTransformer

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Workload:
    """A model, its batches and its loss; ``tokens`` is the examples/tokens per step."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    batches: Callable[[torch.Generator], list[Batch]]
    loss: Callable[[nn.Module, Batch], Tensor]
    tokens: int


def mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers ``widths[0] → … → widths[-1]`` with ReLU between them."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def next_token_loss(model: nn.Module, data: Batch) -> Tensor:
    """Mean cross-entropy of the next-token logits ``model(inputs)`` against ``targets``."""
    logits = model(data[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[1].reshape(-1))


def mlp_workload(quick: bool, device: torch.device, pool: int = 4) -> Workload:
    """MLP 512-512-512-1 on batches of 256 with an MSE loss (quick: 64-64-64-1, batch 32)."""
    width, batch = (64, 32) if quick else (512, 256)
    widths = (width, width, width, 1)

    def batches(gen: torch.Generator) -> list[Batch]:
        return [
            (torch.randn(batch, width, generator=gen).to(device),
             torch.randn(batch, 1, generator=gen).to(device))
            for _ in range(pool)
        ]

    def loss(model: nn.Module, data: Batch) -> Tensor:
        return F.mse_loss(model(data[0]), data[1])

    return Workload(
        name="mlp",
        description=f"MLP {'-'.join(map(str, widths))}, batch {batch}",
        build=lambda: mlp(widths).to(device),
        batches=batches,
        loss=loss,
        tokens=batch,
    )


def lm_workload(quick: bool, device: torch.device, pool: int = 4) -> Workload:
    """The char-LM recipe's transformer (``CharTransformer``: 2 layers, d_model 128, 4 heads, context 128)
    on batches of 16 random byte sequences: 2048 tokens/step (quick: 1 layer, d_model 32, 2 heads,
    context 16, batch 4)."""
    return _char_lm("lm", 16, quick, device, pool)


def lm_8k_workload(quick: bool, device: torch.device, pool: int = 4) -> Workload:
    """The same transformer at the convergence figure's realistic batch, 64 sequences: 8,192 tokens/step
    (quick: as :func:`lm_workload`'s)."""
    return _char_lm("lm_8k", 64, quick, device, pool)


def _char_lm(name: str, batch: int, quick: bool, device: torch.device, pool: int) -> Workload:
    vocab = 256
    d_model, heads, layers, seq, batch = (32, 2, 1, 16, 4) if quick else (128, 4, 2, 128, batch)

    def batches(gen: torch.Generator) -> list[Batch]:
        out = []
        for _ in range(pool):
            text = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)
            out.append((text[:, :-1], text[:, 1:]))
        return out

    def build() -> nn.Module:
        model = CharTransformer(vocab, context=seq, d_model=d_model, n_heads=heads, n_layers=layers)
        return model.to(device)

    return Workload(
        name=name,
        description=(
            f"char-LM recipe transformer: {layers} layers, d_model {d_model}, {heads} heads, seq {seq}, "
            f"batch {batch}, vocab {vocab} ({seq * batch} tokens/step)"
        ),
        build=build,
        batches=batches,
        loss=next_token_loss,
        tokens=seq * batch,
    )


WORKLOADS: tuple[Callable[[bool, torch.device], Workload], ...] = (mlp_workload, lm_workload)
