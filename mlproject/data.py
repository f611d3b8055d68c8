"""Images in memory: the built-in IDX datasets found, verified and loaded; batches served from device-resident
tensors (sharded across ranks) or a DataLoader."""

from __future__ import annotations

import gzip
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlproject.catalog import DEBIAN_PACKAGES, IDX_FILES, NORMALIZATION, NUM_CLASSES, SYSTEM_DIRS, TORCHVISION_NAMES
from mlproject.errors import DataError

log = logging.getLogger(__name__)

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


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

    @property
    def nbytes(self) -> int:
        splits = (self.train, self.val) + ((self.test,) if self.test is not None else ())
        return sum(s.images.numel() for s in splits)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file (gzip or raw), checking magic number, shape header and payload size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}; delete it or point data_dir at an intact copy") from exc
    if len(raw) < 8:
        raise DataError(f"{path} is truncated ({len(raw)} bytes); delete it or point data_dir at an intact copy")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: magic number {found}, expected {magic}; this is not an IDX file of that kind")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, the header promises {expected}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _locate(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def find_dir(candidates: Sequence[Path]) -> Path | None:
    """The first candidate (or its torchvision raw/ subfolder) holding all four files."""
    for base in candidates:
        for directory in (base, *(base / name / "raw" for name in TORCHVISION_NAMES.values())):
            try:
                if all(_locate(directory, stem) for stem in IDX_FILES.values()):
                    return directory
            except PermissionError as exc:
                raise DataError(
                    f"{base}: {exc.strerror}; make it readable by this user or pass another data_dir"
                ) from exc
    return None


@dataclass(frozen=True)
class Source:
    """Where to look, in order, and where a download may go (empty: never download)."""

    candidates: tuple[Path, ...]
    download_to: str = ""


def search_order(dataset: str, data_dir: str, env_dir: str, cache_dir: str) -> Source:
    """data_dir alone when given; else the env variable, Debian's package, the cache, then a download."""
    if data_dir:
        return Source((Path(data_dir),))
    dirs = [Path(env_dir)] if env_dir else []
    dirs.append(Path(SYSTEM_DIRS[dataset]))
    if cache_dir:
        dirs.append(Path(cache_dir) / dataset)
    return Source(tuple(dirs), download_to=cache_dir)


def download(dataset: str, cache_dir: str) -> Path:
    """torchvision's download into the cache; a clear DataError when offline."""
    from torchvision import datasets  # imported here: only the download path needs it

    root = Path(cache_dir) / dataset
    cls = getattr(datasets, TORCHVISION_NAMES[dataset])
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except (OSError, RuntimeError) as exc:
        raise DataError(f"download of {dataset} into {root} failed: {exc}") from exc
    return root / TORCHVISION_NAMES[dataset] / "raw"


def read_split(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _locate(directory, IDX_FILES[f"{prefix}_images"])
    labels_path = _locate(directory, IDX_FILES[f"{prefix}_labels"])
    if images_path is None or labels_path is None:
        raise DataError(f"{directory} lacks the {prefix} images or labels ({IDX_FILES[f'{prefix}_images']}[.gz])")
    images = read_idx(images_path, IMAGE_MAGIC)
    labels = read_idx(labels_path, LABEL_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: images of shape {images.shape[1:]}, expected 28x28")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{directory}: {len(images)} {prefix} images but {len(labels)} labels")
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{labels_path}: label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}")
    return images, labels


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


def locate(dataset: str, candidates: Sequence[Path], download_to: str = "") -> Path:
    """The folder to read; downloads into `download_to` as the last resort (empty: never download)."""
    directory = find_dir(candidates)
    if directory is not None:
        return directory
    tried = ", ".join(str(p) for p in candidates)
    hint = "pass data_dir=<folder with the four *-ubyte[.gz] files>"
    if dataset in DEBIAN_PACKAGES:
        hint = f"install Debian's {DEBIAN_PACKAGES[dataset]} package, or {hint}"
    if not download_to:
        raise DataError(f"{dataset} not found (tried {tried}); {hint}")
    try:
        return download(dataset, download_to)
    except DataError as exc:
        raise DataError(f"{dataset} not found (tried {tried}) and {exc}; {hint}") from exc


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def load(dataset: str, source: Source, val_size: int, train_subset: int, seed: int) -> ImageData:
    """A built-in dataset: its training split less a seeded hold-out, and its test split."""
    directory = locate(dataset, source.candidates, source.download_to)
    log.info("reading %s from %s", dataset, directory)
    train, val = hold_out(_split(*read_split(directory, "train")), val_size, train_subset, seed)
    test = _split(*read_split(directory, "test"))
    mean, std = NORMALIZATION[dataset]
    classes = tuple(str(k) for k in range(NUM_CLASSES))
    return ImageData(dataset, str(directory), train, val, test, (mean,), (std,), classes)


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
    Across the ranks of the default process group (or those given to shard()), each global batch of world x
    batch_size samples is cut into one slice per rank, so that N ranks at batch b see exactly the samples one process
    sees at batch N x b.
    """

    def __init__(self, split: Split, batch_size: int, data: ImageData, shuffle: bool, seed: int) -> None:
        self.images, self.labels = split.images, split.labels  # already on the device: see Split.to
        self.batch_size, self.mean, self.std = batch_size, data.mean, data.std
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.place: tuple[int, int] | None = None  # (rank, world); None: the process group's, read when iterated

    def shard(self, rank: int, world: int) -> None:
        self.place = (rank, world)

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
