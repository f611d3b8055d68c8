"""The built-in IDX datasets (Fashion-MNIST, MNIST): found, verified and loaded into memory."""

from __future__ import annotations

import gzip
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlproject.catalog import DEBIAN_PACKAGES, IDX_FILES, NORMALIZATION, NUM_CLASSES, SYSTEM_DIRS, TORCHVISION_NAMES
from mlproject.errors import DataError
from mlproject.training.batches import ImageData, Split, hold_out

log = logging.getLogger(__name__)

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


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
