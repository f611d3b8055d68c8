"""Image folders in torchvision's ImageFolder layout: listed and decoded by torchvision, resized, held in memory
when they fit (then served like the built-in datasets) or decoded on the fly by DataLoader workers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import datasets
from torchvision.transforms.v2 import functional as tvf

from mlproject.errors import DataError
from mlproject.training.batches import ImageData, Split, hold_out, normalize

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
STATS_SAMPLE = 2000  # training images the streamed path estimates mean and std from
VAL_SHARE = 5  # without val/, the hold-out is at most a fifth of the training images


@dataclass(frozen=True)
class Listing:
    """An image folder's files per split, with the training split's classes."""

    root: Path
    classes: tuple[str, ...]
    samples: dict[str, list[tuple[str, int]]]  # split -> (path, class index)

    @property
    def count(self) -> int:
        return sum(len(files) for files in self.samples.values())


def scan(root: Path) -> Listing:
    """train/ (required), val/ and test/ (optional), one folder per class; clear errors for what cannot train."""
    train = root / "train"
    try:
        present = train.is_dir()
    except PermissionError as exc:
        raise DataError(f"{root}: {exc.strerror}; make it readable by this user or pass another data_dir") from exc
    if not present:
        raise DataError(f"{root} has no train/ folder: an image folder holds train/<class>/<image>, val/ and test/ too")
    try:
        found = datasets.ImageFolder(str(train), allow_empty=True)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"cannot list {train}: {exc}") from exc
    if len(found.classes) < 2:
        raise DataError(f"{train} has {len(found.classes)} class folder(s): a classifier needs at least two")
    if not found.samples:
        raise DataError(f"{train} holds no images (looked for {', '.join(datasets.folder.IMG_EXTENSIONS)})")
    samples = {"train": list(found.samples)}
    for split in SPLITS[1:]:
        folder = root / split
        if folder.is_dir():
            samples[split] = _listed(folder, found.class_to_idx)
    return Listing(root, tuple(found.classes), samples)


def _listed(folder: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    unknown = [c for c in classes if c not in class_to_idx]
    if unknown:
        raise DataError(f"{folder} has class folder(s) {', '.join(unknown)} that train/ lacks")
    present = {c: class_to_idx[c] for c in classes}
    return datasets.folder.make_dataset(str(folder), present, extensions=datasets.folder.IMG_EXTENSIONS)


def decode(path: str, size: int, gray: bool) -> torch.Tensor:
    """One image as uint8 (C, size, size): the shorter side resized to `size`, then the centre cropped."""
    try:
        with Image.open(path) as img:
            tensor = tvf.pil_to_tensor(img.convert("L" if gray else "RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}; delete it or replace it") from exc
    tensor = tvf.resize(tensor, [size], antialias=True)
    return tvf.center_crop(tensor, [size, size])


def is_gray(path: str) -> bool:
    try:
        with Image.open(path) as img:
            return img.mode in GRAY_MODES
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path}: {exc}; delete it or replace it") from exc


def channels_of(paths: Sequence[str]) -> int:
    """1 when every image is grayscale, else 3 (grayscale images are then repeated into RGB)."""
    return 1 if all(is_gray(p) for p in paths) else 3


def estimated_bytes(listing: Listing, size: int) -> int:
    return listing.count * 3 * size * size


def _decoded(samples: list[tuple[str, int]], size: int, gray: bool) -> Split:
    images = torch.stack([decode(path, size, gray) for path, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return Split(images, labels)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), as pixels scaled to [0, 1]."""
    x = images.float().div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    std = x.std(dim=1).clamp_min(1e-3)  # a constant channel would divide by zero
    return tuple(x.mean(dim=1).tolist()), tuple(std.tolist())


def load_in_memory(
    listing: Listing, size: int, val_size: int, seed: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> ImageData:
    """Decode every image once; without val/, a seeded hold-out (at most a fifth of the training images)."""
    gray = channels_of([p for files in listing.samples.values() for p, _ in files]) == 1
    train = _decoded(listing.samples["train"], size, gray)
    if "val" in listing.samples:
        val = _decoded(listing.samples["val"], size, gray)
    else:
        held = min(val_size, max(1, len(train) // VAL_SHARE))
        if held < val_size:
            log.warning(
                "val_size=%d is more than a fifth of the %d training images: holding out %d", val_size, len(train), held
            )
        train, val = hold_out(train, held, 0, seed)
    test = _decoded(listing.samples["test"], size, gray) if "test" in listing.samples else None
    mean, std = _given_or_computed(mean, std, train.images)
    name = f"imagefolder:{listing.root.name}"
    return ImageData(name, str(listing.root), train, val, test, mean, std, listing.classes)


def _given_or_computed(
    mean: tuple[float, ...], std: tuple[float, ...], images: torch.Tensor
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    computed = channel_stats(images)
    channels = images.shape[1]
    for name, given in (("image_mean", mean), ("image_std", std)):
        if given and len(given) not in (1, channels):
            raise DataError(f"{name} has {len(given)} values but the images have {channels} channel(s)")
    pick = lambda given, found: (given * channels if len(given) == 1 else given) if given else found  # noqa: E731
    return pick(mean, computed[0]), pick(std, computed[1])


@dataclass(frozen=True)
class ImageFiles:
    """An image folder too large for memory: files decoded on the fly."""

    name: str
    source: str
    samples: dict[str, list[tuple[str, int]]]
    classes: tuple[str, ...]
    image_size: int
    gray: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return 1 if self.gray else 3

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_streamed(
    listing: Listing, size: int, val_size: int, seed: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> ImageFiles:
    samples = dict(listing.samples)
    rng = np.random.default_rng(seed)
    if "val" not in samples:
        order = rng.permutation(len(samples["train"]))
        held = min(val_size, len(order) // VAL_SHARE)
        files = samples["train"]
        samples["val"] = [files[i] for i in order[:held]]
        samples["train"] = [files[i] for i in order[held:]]
    train = samples["train"]
    probe = [train[i][0] for i in rng.choice(len(train), min(64, len(train)), replace=False)]
    gray = channels_of(probe) == 1  # a sample decides: every file is decoded to these channels
    count = min(STATS_SAMPLE, len(train))
    sample = [samples["train"][i] for i in rng.choice(len(samples["train"]), count, replace=False)]
    mean, std = _given_or_computed(mean, std, _decoded(sample, size, gray).images)
    name = f"imagefolder:{listing.root.name}"
    return ImageFiles(name, str(listing.root), samples, listing.classes, size, gray, mean, std)


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, files: ImageFiles, split: str) -> None:
        self.files, self.samples = files, files.samples[split]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        image = decode(path, self.files.image_size, self.files.gray).unsqueeze(0)
        return normalize(image, self.files.mean, self.files.std)[0], label


def file_loader(
    files: ImageFiles, split: str, batch_size: int, shuffle: bool, seed: int, workers: int, pin: bool
) -> torch.utils.data.DataLoader | None:
    """Decoding runs in `workers` processes; None when the folder has no such split."""
    if split not in files.samples:
        return None
    return torch.utils.data.DataLoader(
        _FileDataset(files, split),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin,
    )


def default_workers(asked: int, cpus: int) -> int:
    """num_workers: -1 means one per CPU of the job's share (processes.threads), at most 8 (decoding scales with
    CPUs, memory with workers)."""
    return asked if asked >= 0 else max(0, min(8, cpus))


def fits(listing: Listing, size: int, limit: int) -> bool:
    return estimated_bytes(listing, size) <= limit


def describe(listing: Listing) -> str:
    counts = ", ".join(f"{split} {len(files)}" for split, files in listing.samples.items())
    return f"{len(listing.classes)} classes; {counts} images"
