"""Offline data modules of the recipes, with a data order that resumes mid-epoch.

The order of an epoch is a function of ``(seed, epoch)`` only, and the training loader checkpoints how
many batches of the epoch it has handed out, so ``trainer.fit(ckpt_path=...)`` after a run stopped
mid-epoch continues with exactly the batches the interrupted run had not seen yet.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from lightning_shampoo._extras import Requirement, check_requirements


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` whose next pass starts ``start`` indices into the epoch.

    Being a ``DistributedSampler``, Lightning neither replaces it under DDP nor forgets ``set_epoch``.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return iter(list(super().__iter__())[start:])


class ResumableDataLoader(DataLoader):
    """A training loader whose position within the epoch is part of the checkpoint.

    Lightning saves ``state_dict()`` of every loader that has ``state_dict``/``load_state_dict`` and
    restores it before the first batch of a resumed fit. The position is only honoured at the same epoch,
    so a checkpoint written at an epoch's end starts the next epoch from its beginning.
    """

    sampler: ResumableSampler

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ResumableSampler) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler)
        self._position = {"epoch": 0, "batches": 0}
        self._resume_from: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: this body runs at the first batch, after Lightning has called ``set_epoch``.
        resume, self._resume_from = self._resume_from, None
        epoch = self.sampler.epoch
        skip = resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
        self.sampler.start = skip * self.batch_size
        self._position = {"epoch": epoch, "batches": skip}
        for batch in super().__iter__():
            self._position["batches"] += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return dict(self._position)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_from = dict(state_dict)


class _RecipeData(pl.LightningDataModule):
    """Shared loaders: a resumable shuffled training loader (a shard per rank), a plain validation loader."""

    train_set: Dataset
    val_set: Dataset

    def __init__(self, batch_size: int, seed: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def train_dataloader(self) -> ResumableDataLoader:
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = ResumableSampler(
            self.train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed
        )
        return ResumableDataLoader(self.train_set, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


def stdlib_source(max_bytes: int) -> bytes:
    """The standard library's own top-level ``.py`` files, in sorted name order, concatenated and cut at
    ``max_bytes``: a corpus every Python install has, identical across runs."""
    root = Path(os.__file__).parent
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        chunks.append(path.read_bytes())
        size += len(chunks[-1])
        if size >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


class CharWindows(Dataset):
    """Non-overlapping windows of ``context`` bytes: input ``x[t]``, target ``x[t + 1]``."""

    def __init__(self, tokens: Tensor, context: int) -> None:
        self.tokens = tokens
        self.context = context

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        window = self.tokens[index * self.context : (index + 1) * self.context + 1].long()
        return window[:-1], window[1:]


class StdlibText(_RecipeData):
    """Byte-level language modelling on the Python standard library's source (vocabulary: the 256 bytes).

    Args:
        context: characters (bytes) per training window.
        batch_size: windows per batch.
        max_bytes: size of the corpus read from the standard library.
        val_fraction: share of the corpus, taken from its end, held out for validation.
        seed: seed of the training order.
    """

    vocab_size = 256

    def __init__(
        self,
        context: int = 128,
        batch_size: int = 32,
        max_bytes: int = 1_000_000,
        val_fraction: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, seed)
        self.context = context
        self.max_bytes = max_bytes
        self.val_fraction = val_fraction

    def setup(self, stage: str) -> None:
        tokens = torch.frombuffer(bytearray(stdlib_source(self.max_bytes)), dtype=torch.uint8)
        split = int(len(tokens) * (1.0 - self.val_fraction))
        self.train_set = CharWindows(tokens[:split], self.context)
        self.val_set = CharWindows(tokens[split:], self.context)


class Digits(_RecipeData):
    """scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes; bundled, no download), pixels
    scaled to [0, 1] and split by a fixed permutation.

    Args:
        batch_size: images per batch.
        val_fraction: share of the images held out for validation.
        seed: seed of the split and of the training order.
    """

    num_features = 64
    num_classes = 10
    # Optional (the `recipes` extra): checked when built (and by the CLI before it builds anything).
    requires = (Requirement("sklearn", "scikit-learn", "The digits data (scikit-learn's bundled images)"),)

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> None:
        check_requirements(type(self))
        super().__init__(batch_size, seed)
        self.val_fraction = val_fraction

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(len(labels) * self.val_fraction)
        self.val_set = TensorDataset(images[order[:n_val]], labels[order[:n_val]])
        self.train_set = TensorDataset(images[order[n_val:]], labels[order[n_val:]])
