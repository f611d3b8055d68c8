"""Image data held in memory as uint8 and the batches served from it: cut on the device (sharded across ranks) or
by a DataLoader, normalised per channel as they are served."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlproject.errors import DataError


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class ImageData:
    """A classification dataset held in memory as uint8, normalised per channel when served."""

    name: str
    source: str  # where it was read from: a run input's source
    train: Split
    val: Split
    test: Split | None  # None: the data has no test split
    mean: tuple[float, ...]  # per channel, of pixels scaled to [0, 1]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def hold_out(train: Split, val_size: int, train_subset: int, seed: int) -> tuple[Split, Split]:
    """A seeded hold-out of val_size samples, then the first train_subset of the rest (0 = all)."""
    available = len(train) - val_size
    if available < 1:
        raise DataError(f"val_size={val_size} leaves no training data ({len(train)} samples in all)")
    if train_subset > available:
        raise DataError(f"train_subset={train_subset} exceeds the {available} training samples left after val_size")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_subset:
        train_idx = train_idx[:train_subset]
    return Split(train.images[train_idx], train.labels[train_idx]), Split(train.images[val_idx], train.labels[val_idx])


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float, zero mean and unit variance per channel over the training split."""
    x = images.float().div_(255.0)
    if len(mean) == 1:  # a scalar is cheaper than a broadcast tensor, and LeNet's step is small
        return x.sub_(mean[0]).div_(std[0])
    shape = (1, len(mean), 1, 1)
    return x.sub_(torch.tensor(mean, device=x.device).view(shape)).div_(torch.tensor(std, device=x.device).view(shape))


class DeviceBatches:
    """Batches cut from one uint8 tensor on the device: normalised, shuffled and sliced there, no per-sample Python.

    Shuffling uses its own generator seeded by (seed, epoch), so the batch order never depends on global RNG state.
    Across the ranks of the default process group (or the `place` given), each global batch of world x
    batch_size samples is cut into one slice per rank, so that N ranks at batch b see exactly the samples one process
    sees at batch N x b.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        data: ImageData,
        shuffle: bool,
        seed: int,
        place: tuple[int, int] | None = None,
    ) -> None:
        self.images, self.labels = split.images, split.labels  # already on the device: see Split.to
        self.batch_size, self.mean, self.std = batch_size, data.mean, data.std
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.place = place  # (rank, world); None: the process group's, read when iterated

    def _place(self) -> tuple[int, int]:
        if self.place is not None:
            return self.place
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / (self.batch_size * self._place()[1]))

    def set_epoch(self, epoch: int) -> None:
        """Pin the next pass's shuffle to `epoch`, e.g. when a fit resumes from a checkpoint."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=gen).to(self.images.device)
            self.epoch += 1
        rank, world = self._place()
        step = self.batch_size * world
        for start in range(0, n, step):
            lo, hi = _slice(min(step, n - start), rank, world)
            if self.shuffle:  # index_select: a tenth of the time of images[idx] for a batch of rows
                idx = order[start + lo : start + hi]
                images, labels = self.images.index_select(0, idx), self.labels.index_select(0, idx)
            else:
                images, labels = self.images[start + lo : start + hi], self.labels[start + lo : start + hi]
            yield normalize(images, self.mean, self.std), labels


def _slice(size: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's part of a global batch of `size`: equal parts, the first `size % world` ranks one larger."""
    base, extra = divmod(size, world)
    if base == 0 and rank >= extra:  # fewer samples than ranks: a rank repeats the first, as DistributedSampler pads
        return 0, 1
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class _NormalizedSplit(torch.utils.data.Dataset):
    def __init__(self, split: Split, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.split, self.mean, self.std = split, mean, std

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(self.split.images[i : i + 1], self.mean, self.std)[0], self.split.labels[i]


def loader_batches(
    split: Split, batch_size: int, data: ImageData, shuffle: bool, seed: int
) -> torch.utils.data.DataLoader:
    """The DataLoader path, for data that should not live on the device. Indexing a tensor in memory is cheap, so
    no workers: they would only add the copies between processes. Several ranks get Lightning's sampler."""
    return torch.utils.data.DataLoader(
        _NormalizedSplit(split, data.mean, data.std),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
    )


def served_batch_size(loader: Any) -> int | None:
    """The batch size a training loader serves: a DataLoader's, DeviceBatches', or the one loader inside Lightning's
    CombinedLoader; None where it does not say (a sampler of its own, several loaders)."""
    inner = getattr(loader, "iterables", None)
    if inner is not None and not isinstance(loader, (DeviceBatches, torch.utils.data.DataLoader)):
        loaders = (
            list(inner.values()) if isinstance(inner, dict) else list(inner) if isinstance(inner, list) else [inner]
        )
        return served_batch_size(loaders[0]) if len(loaders) == 1 else None
    size = getattr(loader, "batch_size", None)
    return size if isinstance(size, int) else None
