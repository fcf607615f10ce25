"""The timed workloads: an MLP regression step and a small causal transformer LM step.

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


class TinyLM(nn.Module):
    """Pre-norm causal transformer LM: token + learnt position embeddings, ``layers`` blocks, a head."""

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        block = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        seq = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:seq]
        hidden = self.blocks(hidden, mask=self.causal[:seq, :seq], is_causal=True)
        return self.head(self.norm(hidden))


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
    """Transformer LM: 2 layers, d_model 256, 4 heads, seq 128, batch 32, vocab 96 (4096 tokens/step)."""
    vocab, d_model, heads, layers, seq, batch = (96, 32, 2, 1, 16, 4) if quick else (96, 256, 4, 2, 128, 32)

    def batches(gen: torch.Generator) -> list[Batch]:
        out = []
        for _ in range(pool):
            text = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)
            out.append((text[:, :-1], text[:, 1:]))
        return out

    def loss(model: nn.Module, data: Batch) -> Tensor:
        logits = model(data[0])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[1].reshape(-1))

    return Workload(
        name="lm",
        description=(
            f"transformer LM: {layers} layers, d_model {d_model}, {heads} heads, seq {seq}, batch {batch}, "
            f"vocab {vocab} ({seq * batch} tokens/step)"
        ),
        build=lambda: TinyLM(vocab, d_model, heads, layers, seq).to(device),
        batches=batches,
        loss=loss,
        tokens=seq * batch,
    )


WORKLOADS: tuple[Callable[[bool, torch.device], Workload], ...] = (mlp_workload, lm_workload)
