"""Shared helpers: small IDX datasets written by the tests, and where the real Fashion-MNIST lives."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    raw = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_dataset(folder: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """Four gzipped IDX files whose label is readable from the image (class k brightens row band k)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k + 4 : 2 * k + 6, :] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    return folder


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "tiny")


requires_fashion_mnist = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist",
)
