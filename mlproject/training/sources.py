"""The three data providers: the built-in datasets, an image folder (in memory or decoded on the fly), a user's
LightningDataModule; each gives the loaders a Trainer reads, the fit's steps, the run's inputs and an example."""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlproject.catalog import ENV_DIRS
from mlproject.config import ConfigError, JobConfig, channel_stats, json_object
from mlproject.errors import DataError
from mlproject.processes import threads
from mlproject.record.outputs import DataInput
from mlproject.training import batches, idx, images, lightning_api
from mlproject.training.batches import ImageData, Split
from mlproject.training.classpaths import import_class, instantiate
from mlproject.training.lightning_api import Lightning

log = logging.getLogger(__name__)

# The device path holds a split as uint8 on the device; past this size a DataLoader streams it instead.
DEVICE_DATA_LIMIT_BYTES = 4 * 2**30
EVAL_BATCH = 1024  # evaluation has no gradient: larger batches are simply faster
PROBE_SIZE = 1024  # held-out samples lr_probe scores after every sweep step: ~1/5 of a validation pass


@dataclass(frozen=True)
class Loaders:
    """What one Trainer call reads: the job's own iterables, a user's data module, or (`own`) the dataloaders the
    module defines itself, which the Trainer asks it for."""

    train: Any = None
    val: Any = None
    test: Any = None
    datamodule: Any = None
    own: frozenset[str] = frozenset()  # the module's own loaders: the hooks it defines (train, val, test)

    def fit_kwargs(self) -> dict[str, Any]:
        if self.own:
            return {}
        if self.datamodule is not None:
            return {"datamodule": self.datamodule}
        return {"train_dataloaders": self.train, "val_dataloaders": self.val}

    def sweep_kwargs(self) -> dict[str, Any]:
        if self.own:
            return {}
        return {"datamodule": self.datamodule} if self.datamodule is not None else {"train_dataloaders": self.train}

    def test_kwargs(self) -> dict[str, Any] | None:
        """None when there is nothing to test on."""
        if self.own:
            return {} if "test" in self.own else None
        if self.datamodule is not None:
            has_test = lightning_api.defines(type(self.datamodule), "test_dataloader")
            return {"datamodule": self.datamodule} if has_test else None
        return {"dataloaders": self.test} if self.test is not None else None

    def has_validation(self) -> bool:
        if self.own:
            return "val" in self.own
        if self.datamodule is not None:
            return lightning_api.defines(type(self.datamodule), "val_dataloader")
        return self.val is not None

    def validation_kwargs(self) -> dict[str, Any]:
        if self.own:
            return {}
        return {"datamodule": self.datamodule} if self.datamodule is not None else {"dataloaders": self.val}

    def iterables(self) -> list[Any]:
        return [it for it in (self.train, self.val, self.test) if it is not None]


@dataclass(frozen=True)
class ImageShape:
    """What a built-in or torchvision network must fit."""

    channels: int
    classes: int
    size: int


@dataclass(frozen=True)
class DataSource:
    """What a data provider gives the job: loaders a Trainer reads, and what the job needs to know of them."""

    loaders: Callable[[int, str], Loaders]  # (shuffle seed, "cpu"/"cuda") -> what one Trainer call reads
    steps_per_epoch: Callable[[int], int | None]  # world size -> optimizer steps an epoch (None: not known yet)
    inputs: list[DataInput] = field(default_factory=list)  # the datasets the run records
    probe: Callable[[torch.device], Any] | None = None  # lr_probe's fixed held-out batch
    example: Callable[[], Any] | None = None  # a real batch's model input, for the logged model's signature
    own: bool = False  # the module's own dataloaders
    subsets: bool = True  # whether train_subset applies (a data module, or a module's own loaders, serve all theirs)


def in_memory(cfg: JobConfig, source: ImageData) -> tuple[ImageShape, DataSource]:
    """Loaders, sizes and inputs of image data held in memory (built-in datasets, small image folders)."""
    cache: dict[str, Split] = {}

    def on(device: str, name: str, split: Split) -> Split:
        if name not in cache or cache[name].images.device.type != device:
            cache[name] = split.to(torch.device(device))
        return cache[name]

    def loaders(seed: int, device: str) -> Loaders:
        def served(name: str, split: Split | None, size: int, shuffle: bool, s: int) -> Any:
            if split is None:
                return None
            if cfg.data_mode == "loader":
                return batches.loader_batches(split, size, source, shuffle, s)
            return batches.DeviceBatches(on(device, name, split), size, source, shuffle, s)

        eval_batch = max(cfg.batch_size, EVAL_BATCH)
        return Loaders(
            served("train", source.train, cfg.batch_size, True, seed),
            served("val", source.val, eval_batch, False, 0),
            served("test", source.test, eval_batch, False, 0),
        )

    def probe(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = source.val.images[:PROBE_SIZE].to(device), source.val.labels[:PROBE_SIZE].to(device)
        return batches.normalize(images, source.mean, source.std), labels

    shape = ImageShape(source.channels, source.num_classes, source.image_size)
    splits = (("training", source.train), ("validation", source.val), ("test", source.test))
    inputs = [
        DataInput(f"{source.name}-{context}", context, source.source, (split.images.numpy(), split.labels.numpy()))
        for context, split in splits
        if split is not None
    ]
    return shape, DataSource(
        loaders,
        lambda world: math.ceil(len(source.train) / (cfg.batch_size * world)),
        inputs,
        probe=probe,
        example=lambda: batches.normalize((source.test or source.val).images[:2], source.mean, source.std),
    )


def streamed(cfg: JobConfig, files: images.ImageFiles) -> tuple[ImageShape, DataSource]:
    workers = images.default_workers(cfg.num_workers, math.floor(threads.read_share().cpus))

    def loaders(seed: int, device: str) -> Loaders:
        pin = device == "cuda"
        eval_batch = max(cfg.batch_size, EVAL_BATCH)
        return Loaders(
            images.file_loader(files, "train", cfg.batch_size, True, seed, workers, pin),
            images.file_loader(files, "val", eval_batch, False, 0, workers, pin),
            images.file_loader(files, "test", eval_batch, False, 0, workers, pin),
        )

    def example() -> torch.Tensor:
        path, _ = files.samples["val"][0]
        return batches.normalize(images.decode(path, files.image_size, files.gray).unsqueeze(0), files.mean, files.std)

    shape = ImageShape(files.channels, files.num_classes, files.image_size)
    inputs = [
        DataInput(f"{files.name}-{context}", context, f"{files.source}/{split}", rows=len(files.samples[split]))
        for context, split in (("training", "train"), ("validation", "val"), ("test", "test"))
        if split in files.samples
    ]
    steps = lambda world: math.ceil(len(files.samples["train"]) / (cfg.batch_size * world))  # noqa: E731
    return shape, DataSource(loaders, steps, inputs, example=example)


def image_folder(cfg: JobConfig) -> ImageData | images.ImageFiles:
    if not cfg.data_dir:
        raise ConfigError("data_dir", "", "the image folder (train/<class>/<image>, val/ and test/ optional)")
    root = Path(cfg.data_dir).expanduser()
    if not os.path.isdir(root):  # isdir: a folder this user cannot enter is scan()'s to name
        raise DataError(f"data_dir={cfg.data_dir}: no such folder")
    listing = images.scan(root)
    mean, std = channel_stats("image_mean", cfg.image_mean), channel_stats("image_std", cfg.image_std)
    log.info("image folder %s: %s", root, images.describe(listing))
    if images.fits(listing, cfg.image_size, DEVICE_DATA_LIMIT_BYTES) and cfg.data_mode != "loader":
        return images.load_in_memory(listing, cfg.image_size, cfg.val_size, cfg.seed, mean, std)
    return images.load_streamed(listing, cfg.image_size, cfg.val_size, cfg.seed, mean, std)


def builtin_source(cfg: JobConfig) -> idx.Source:
    env_dir = os.environ.get(ENV_DIRS[cfg.dataset], "")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlproject"
    return idx.search_order(cfg.dataset, cfg.data_dir, env_dir, str(cache))


def user_data(cfg: JobConfig) -> tuple[Any, Lightning]:
    cls = import_class("dataset", cfg.dataset)
    found = lightning_api.of_class(cls)
    if found is None or not lightning_api.is_datamodule(cls):
        raise ConfigError("dataset", cfg.dataset, "a LightningDataModule subclass (pytorch_lightning or lightning)")
    datamodule = instantiate("dataset_args", cls, json_object("dataset_args", cfg.dataset_args))
    if not lightning_api.defines(cls, "train_dataloader"):
        raise ConfigError("dataset", cfg.dataset, "a LightningDataModule that defines train_dataloader()")
    return datamodule, found


def datamodule_shape(cfg: JobConfig, datamodule: Any) -> ImageShape:
    """For a built-in or torchvision network on a user's data module: classes from its `num_classes`, channels and
    size from a real batch."""
    classes = getattr(datamodule, "num_classes", None)
    if not isinstance(classes, int) or classes < 2:
        raise ConfigError(
            "dataset", cfg.dataset, f"a data module with an integer num_classes >= 2 for model {cfg.model}"
        )
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ConfigError(
            "dataset", cfg.dataset, f"(images, labels) batches of shape (N, C, H, W) for model {cfg.model}"
        )
    return ImageShape(int(x.shape[1]), classes, int(x.shape[-1]))


def datamodule_inputs(cfg: JobConfig, datamodule: Any) -> list[DataInput]:
    """A data module is a run input when it says where its data comes from (a `data_dir` or `source` attribute)."""
    source = getattr(datamodule, "source", None) or getattr(datamodule, "data_dir", None)
    if not source:
        return []
    return [DataInput(cfg.dataset, "training", str(source))]


def datamodule_source(cfg: JobConfig, datamodule: Any) -> DataSource:
    """A user's data module, read as it is: its own loaders, steps known once a Trainer has set it up."""
    loaders = lambda seed, device: Loaders(datamodule=datamodule)  # noqa: E731

    @functools.cache
    def per_epoch(world: int) -> int | None:
        """Its training loader's batches, set up as Lightning will set it up; one process only (several would each
        prepare the data at once), and None for a loader without a length."""
        if world != 1:
            return None
        datamodule.prepare_data()
        datamodule.setup("fit")
        try:
            return len(datamodule.train_dataloader())
        except TypeError:
            return None

    return DataSource(loaders, per_epoch, datamodule_inputs(cfg, datamodule), subsets=False)


def module_source(cfg: JobConfig, cls: type | None) -> DataSource:
    """A module's own dataloaders: it defines train_dataloader (and maybe val_ and test_); the Trainer asks it."""
    if cls is None:
        raise ConfigError("dataset", cfg.dataset, "a dataset for a built-in network: they bring no dataloaders")
    hooks = frozenset(name for name in ("train", "val", "test") if lightning_api.defines(cls, f"{name}_dataloader"))
    if "train" not in hooks:
        accepted = f"a model that defines train_dataloader() ({cls.__qualname__} does not)"
        raise ConfigError("dataset", cfg.dataset, accepted)
    loaders = lambda seed, device: Loaders(own=hooks)  # noqa: E731
    return DataSource(loaders, lambda world: None, own=True, subsets=False)
