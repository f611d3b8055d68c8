"""Reading and verifying IDX files, the search order, the hold-out split and device-resident batches."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from mlproject.errors import DataError
from mlproject.training import batches, idx
from tests.helpers import idx_bytes, write_dataset, write_idx


def load(folder: Path, val_size: int = 50, train_subset: int = 0) -> batches.ImageData:
    return idx.load("fashion-mnist", idx.Source((folder,)), val_size, train_subset, seed=1)


def test_loads_a_written_dataset_with_the_hold_out_and_subset(tiny_data):
    ds = load(tiny_data, val_size=50, train_subset=100)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (100, 50, 100)
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape[1:] == (1, 28, 28)
    assert ds.source == str(tiny_data)


def test_hold_out_is_seeded_and_disjoint(tiny_data):
    a, b = load(tiny_data), load(tiny_data)
    assert torch.equal(a.val.images, b.val.images)
    train_rows = {bytes(x.numpy()) for x in a.train.images}
    assert not any(bytes(x.numpy()) in train_rows for x in a.val.images)


def test_uncompressed_files_and_torchvision_layout_are_found(tmp_path):
    src = write_dataset(tmp_path / "src")
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in src.iterdir():
        (raw / f.name.removesuffix(".gz")).write_bytes(gzip.decompress(f.read_bytes()))
    ds = load(tmp_path / "root")
    assert ds.source == str(raw)


def corrupt(folder: Path, name: str, content: bytes) -> None:
    (folder / name).write_bytes(content)


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("train-images-idx3-ubyte.gz", lambda b: gzip.compress(b)[:200], "cannot read"),
        ("train-images-idx3-ubyte.gz", lambda b: gzip.compress(b[:-10]), "truncated or corrupt"),
        ("train-images-idx3-ubyte.gz", lambda b: gzip.compress(b"\x00\x00\x08\x01" + b[4:]), "magic number 2049"),
        ("train-labels-idx1-ubyte.gz", lambda b: b"not gzip at all", "cannot read"),
    ],
)
def test_corrupt_files_are_clear_errors(tiny_data, name, make, message):
    original = gzip.decompress((tiny_data / name).read_bytes())
    corrupt(tiny_data, name, make(original))
    with pytest.raises(DataError, match=message) as err:
        load(tiny_data)
    assert name.removesuffix(".gz") in str(err.value)


def test_out_of_range_label_is_an_error(tiny_data):
    write_idx(tiny_data / "t10k-labels-idx1-ubyte.gz", np.full(100, 12, np.uint8), 2049)
    with pytest.raises(DataError, match="label 12 out of range"):
        load(tiny_data)


def test_image_label_count_mismatch_is_an_error(tiny_data):
    write_idx(tiny_data / "t10k-labels-idx1-ubyte.gz", np.zeros(99, np.uint8), 2049)
    with pytest.raises(DataError, match="100 test images but 99 labels"):
        load(tiny_data)


def test_a_folder_with_only_some_files_names_the_places_tried(tiny_data, tmp_path):
    (tiny_data / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"not found \(tried .*tiny\).*dataset-fashion-mnist"):
        load(tiny_data)


def test_subset_larger_than_the_data_is_an_error(tiny_data):
    with pytest.raises(DataError, match="train_subset=1000 exceeds the 250"):
        load(tiny_data, val_size=50, train_subset=1000)


def test_search_order_prefers_data_dir_then_env_then_system_then_cache():
    assert idx.search_order("mnist", "/d", "/env", "/cache").candidates == (Path("/d"),)
    assert idx.search_order("mnist", "/d", "/env", "/cache").download_to == ""
    src = idx.search_order("fashion-mnist", "", "/env", "/cache")
    assert src.candidates == (Path("/env"), Path("/usr/share/datasets/fashion-mnist"), Path("/cache/fashion-mnist"))
    assert src.download_to == "/cache"


def test_idx_reader_rejects_a_wrong_header_size(tmp_path):
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(idx_bytes(np.zeros(10, np.uint8), 2049)[:-1])
    with pytest.raises(DataError, match="truncated"):
        idx.read_idx(p, 2049)


def test_device_batches_cover_every_sample_once_and_reshuffle_each_epoch(tiny_data):
    ds = load(tiny_data, val_size=50)
    served = batches.DeviceBatches(ds.train, 64, ds, shuffle=True, seed=3)
    assert len(served) == 4  # 250 samples
    first = torch.cat([y for _, y in served])
    second = torch.cat([y for _, y in served])
    assert sorted(first.tolist()) == sorted(ds.train.labels.tolist())
    assert not torch.equal(first, second)
    x, _ = next(iter(served))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32


def test_device_batches_do_not_depend_on_global_rng(tiny_data):
    ds = load(tiny_data)
    torch.manual_seed(0)
    a = [y for _, y in batches.DeviceBatches(ds.train, 32, ds, shuffle=True, seed=3)]
    torch.manual_seed(99)
    b = [y for _, y in batches.DeviceBatches(ds.train, 32, ds, shuffle=True, seed=3)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_loader_path_serves_the_same_normalised_samples(tiny_data):
    ds = load(tiny_data)
    x_loader = torch.cat([x for x, _ in batches.loader_batches(ds.test, 32, ds, False, 0)])
    x_device = torch.cat([x for x, _ in batches.DeviceBatches(ds.test, 32, ds, False, 0)])
    assert torch.allclose(x_loader, x_device)


@pytest.mark.parametrize("n, world", [(250, 2), (250, 3), (257, 4), (64, 2)])
def test_sharded_batches_are_disjoint_slices_of_the_one_process_batches_at_world_times_the_size(tiny_data, n, world):
    """N ranks at batch b see exactly the samples one process sees at batch N x b, in the same order."""
    ds = load(tiny_data, val_size=50 if n != 257 else 43)
    split = batches.Split(ds.train.images[:n], ds.train.labels[:n])
    one = list(batches.DeviceBatches(split, 16 * world, ds, shuffle=True, seed=5))
    ranks = []
    for rank in range(world):
        shard = batches.DeviceBatches(split, 16, ds, shuffle=True, seed=5, place=(rank, world))
        ranks.append(list(shard))
        assert len(shard) == len(one)
    for step, (x, y) in enumerate(one):
        parts = [r[step] for r in ranks]
        if len(y) >= world:  # a last global batch smaller than the world repeats a sample instead
            assert torch.equal(torch.cat([p[1] for p in parts]), y)
            assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert all(len(p[1]) >= 1 for p in parts)
