"""What a job trains: a (module, data) pair from three model providers (the built-in networks, torchvision's
classifiers, a LightningModule's class path) and three data providers (the built-in datasets, an image folder, a
LightningDataModule's class path). Everything the user named is resolved and checked here, before training."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlproject import data, images, lightning_api
from mlproject.catalog import BUILTIN_DATASETS, ENV_DIRS
from mlproject.config import (
    BUILTIN_MODELS,
    IMAGE_FOLDER,
    ConfigError,
    JobConfig,
    channel_stats,
    is_class_path,
    json_object,
)
from mlproject.errors import DataError
from mlproject.lightning_api import Lightning
from mlproject.model import builtin_net, classifier, torchvision_models, torchvision_net

log = logging.getLogger(__name__)

# The device path holds a split as uint8 on the device; past this size a DataLoader streams it instead.
DEVICE_DATA_LIMIT_BYTES = 4 * 2**30
EVAL_BATCH = 1024  # evaluation has no gradient: larger batches are simply faster
LR_ATTRS = ("lr", "learning_rate")  # where Lightning's own finder looks
PROBE_SIZE = 1024  # held-out samples lr_probe scores after every sweep step: ~1/5 of a validation pass


@dataclass(frozen=True)
class Loaders:
    """What one Trainer call reads: the job's own iterables, or a user's data module."""

    train: Any = None
    val: Any = None
    test: Any = None
    datamodule: Any = None

    def fit_kwargs(self) -> dict[str, Any]:
        if self.datamodule is not None:
            return {"datamodule": self.datamodule}
        return {"train_dataloaders": self.train, "val_dataloaders": self.val}

    def sweep_kwargs(self) -> dict[str, Any]:
        return {"datamodule": self.datamodule} if self.datamodule is not None else {"train_dataloaders": self.train}

    def test_kwargs(self) -> dict[str, Any] | None:
        """None when there is nothing to test on."""
        if self.datamodule is not None:
            has_test = _overrides(self.datamodule, "test_dataloader")
            return {"datamodule": self.datamodule} if has_test else None
        return {"dataloaders": self.test} if self.test is not None else None

    def iterables(self) -> list[Any]:
        return [it for it in (self.train, self.val, self.test) if it is not None]


@dataclass(frozen=True)
class DataInput:
    """A dataset the run records as an input: numpy arrays (built-in) or a folder's description."""

    name: str
    context: str  # training, validation, test
    source: str
    arrays: tuple[Any, Any] | None = None  # images, labels
    rows: int = 0


@dataclass
class Task:
    """A module factory and its data, with what the job needs to know of both."""

    lightning: Lightning
    model_name: str
    data_name: str
    user_module: bool
    make_module: Callable[[bool], Any]  # (channels_last) -> a fresh module, built under the caller's seed
    loaders: Callable[[int, str], Loaders]  # (shuffle seed, "cpu"/"cuda") -> what a Trainer reads
    steps_per_epoch: Callable[[int], int | None]  # world size -> optimizer steps an epoch (None: not known yet)
    data_bytes: int = 0  # the bytes a device-resident copy would take (0: not in memory)
    probe: Callable[[torch.device], Any] | None = None  # lr_probe's fixed held-out batch
    example: Callable[[], Any] | None = None  # a real batch's model input, for the logged model's signature
    inputs: list[DataInput] = field(default_factory=list)
    lr_attr: str = "lr"


# --- class paths -----------------------------------------------------------------------------------------------


def add_code_path(code: str) -> None:
    """Put the user's folder first on the import path (and on that of processes this one starts)."""
    if not code:
        return
    folder = Path(code).expanduser()
    if not folder.is_dir():
        raise ConfigError("code", code, "an existing folder holding the user's package")
    path = str(folder.resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH", "")]))


def import_class(param: str, path: str) -> type:
    """The class a class path names; a ConfigError naming `param` with the import's own message otherwise."""
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(param, path, f"an importable class path ({exc}); set code= to the folder holding it") from exc
    except Exception as exc:  # the user's module failed while importing: its error is the answer
        raise ConfigError(param, path, f"a module that imports ({type(exc).__name__}: {exc})") from exc
    found = getattr(module, attr, None)
    if not isinstance(found, type):
        raise ConfigError(param, path, f"a class defined in {module_name} (it has no class {attr})")
    return found


def instantiate(param: str, cls: type, kwargs: dict[str, Any]) -> Any:
    """cls(**kwargs), LightningCLI-style: nested {"class_path", "init_args"} values are built first."""
    built = {key: _nested(param, value) for key, value in kwargs.items()}
    try:
        return cls(**built)
    except TypeError as exc:
        raise ConfigError(param, json.dumps(kwargs), f"init arguments {cls.__qualname__} accepts ({exc})") from exc


def _nested(param: str, value: Any) -> Any:
    if isinstance(value, dict) and "class_path" in value:
        inner = import_class(param, value["class_path"])
        return instantiate(param, inner, value.get("init_args") or {})
    return value


def _overrides(obj: Any, hook: str) -> bool:
    """Whether the object's class defines `hook` itself rather than inheriting Lightning's default."""
    for klass in type(obj).__mro__:
        if hook in vars(klass):
            return not klass.__module__.startswith(("pytorch_lightning", "lightning"))
    return False


# --- the data --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageShape:
    """What a built-in or torchvision network must fit."""

    channels: int
    classes: int
    size: int


def _in_memory(cfg: JobConfig, source: data.ImageData) -> tuple[ImageShape, dict[str, Any]]:
    """Loaders, sizes and inputs of image data held in memory (built-in datasets, small image folders)."""
    cache: dict[str, data.Split] = {}

    def on(device: str, name: str, split: data.Split) -> data.Split:
        if name not in cache or cache[name].images.device.type != device:
            cache[name] = split.to(torch.device(device))
        return cache[name]

    def loaders(seed: int, device: str) -> Loaders:
        def batches(name: str, split: data.Split | None, size: int, shuffle: bool, s: int) -> Any:
            if split is None:
                return None
            if cfg.data_mode == "loader":
                return data.loader_batches(split, size, source, shuffle, s)
            return data.DeviceBatches(on(device, name, split), size, source, shuffle, s)

        eval_batch = max(cfg.batch_size, EVAL_BATCH)
        return Loaders(
            batches("train", source.train, cfg.batch_size, True, seed),
            batches("val", source.val, eval_batch, False, 0),
            batches("test", source.test, eval_batch, False, 0),
        )

    def probe(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = source.val.images[:PROBE_SIZE].to(device), source.val.labels[:PROBE_SIZE].to(device)
        return data.normalize(images, source.mean, source.std), labels

    shape = ImageShape(source.channels, source.num_classes, source.image_size)
    splits = (("training", source.train), ("validation", source.val), ("test", source.test))
    inputs = [
        DataInput(f"{source.name}-{context}", context, source.source, (split.images.numpy(), split.labels.numpy()))
        for context, split in splits
        if split is not None
    ]
    parts = {
        "loaders": loaders,
        "steps_per_epoch": lambda world: math.ceil(len(source.train) / (cfg.batch_size * world)),
        "data_bytes": source.nbytes,
        "probe": probe,
        "example": lambda: data.normalize((source.test or source.val).images[:2], source.mean, source.std),
        "inputs": inputs,
    }
    return shape, parts


def _streamed(cfg: JobConfig, files: images.ImageFiles) -> tuple[ImageShape, dict[str, Any]]:
    workers = images.default_workers(cfg.num_workers, os.cpu_count() or 1)

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
        return data.normalize(images.decode(path, files.image_size, files.gray).unsqueeze(0), files.mean, files.std)

    shape = ImageShape(files.channels, files.num_classes, files.image_size)
    inputs = [
        DataInput(f"{files.name}-{context}", context, f"{files.source}/{split}", rows=len(files.samples[split]))
        for context, split in (("training", "train"), ("validation", "val"), ("test", "test"))
        if split in files.samples
    ]
    parts = {
        "loaders": loaders,
        "steps_per_epoch": lambda world: math.ceil(len(files.samples["train"]) / (cfg.batch_size * world)),
        "example": example,
        "inputs": inputs,
    }
    return shape, parts


def _image_folder(cfg: JobConfig) -> data.ImageData | images.ImageFiles:
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


def _builtin_source(cfg: JobConfig) -> data.Source:
    env_dir = os.environ.get(ENV_DIRS[cfg.dataset], "")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlproject"
    return data.search_order(cfg.dataset, cfg.data_dir, env_dir, str(cache))


def _user_data(cfg: JobConfig) -> tuple[Any, Lightning]:
    cls = import_class("dataset", cfg.dataset)
    found = lightning_api.of_class(cls)
    if found is None or not lightning_api.is_datamodule(cls):
        raise ConfigError("dataset", cfg.dataset, "a LightningDataModule subclass (pytorch_lightning or lightning)")
    datamodule = instantiate("dataset_args", cls, json_object("dataset_args", cfg.dataset_args))
    if not _overrides(datamodule, "train_dataloader"):
        raise ConfigError("dataset", cfg.dataset, "a LightningDataModule that defines train_dataloader()")
    return datamodule, found


def _datamodule_shape(cfg: JobConfig, datamodule: Any) -> ImageShape:
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


# --- the task --------------------------------------------------------------------------------------------------


def check(cfg: JobConfig) -> None:
    """The names alone, without reading data: what a launcher checks before it starts any process."""
    _model_class(cfg)
    if is_class_path(cfg.dataset):
        cls = import_class("dataset", cfg.dataset)
        if not lightning_api.is_datamodule(cls):
            raise ConfigError("dataset", cfg.dataset, "a LightningDataModule subclass (pytorch_lightning or lightning)")
    elif cfg.dataset == IMAGE_FOLDER and not Path(cfg.data_dir).expanduser().is_dir():
        raise ConfigError("data_dir", cfg.data_dir, "the image folder (train/<class>/<image>, val/ and test/ optional)")


def describe(cfg: JobConfig) -> str:
    """What the job would train, checked as far as it goes without reading the data: the `check` command's line."""
    check(cfg)
    model = cfg.model if not cfg.user_module else f"{cfg.model} (LightningModule)"
    if cfg.dataset in BUILTIN_DATASETS:
        source = _builtin_source(cfg)
        found = data.find_dir(source.candidates)
        where = str(found) if found else f"not found here (tried {', '.join(map(str, source.candidates))})"
        if found is None and not source.download_to:
            raise DataError(f"{cfg.dataset} {where}")
        return f"model {model} on {cfg.dataset} from {where}"
    if cfg.dataset == IMAGE_FOLDER:
        listing = images.scan(Path(cfg.data_dir).expanduser())
        return f"model {model} on the image folder {listing.root}: {images.describe(listing)}"
    return f"model {model} on {cfg.dataset} (LightningDataModule)"


def build(cfg: JobConfig) -> Task:
    """Resolve the model and the dataset cfg names into a Task; every mistake is a ConfigError or DataError. The
    names are checked before any data is read."""
    model_class = _model_class(cfg)
    datamodule, lightning, parts, shape = None, lightning_api.DEFAULT, {}, None
    if cfg.dataset_args.strip() not in ("", "{}") and (cfg.dataset in BUILTIN_DATASETS or cfg.dataset == IMAGE_FOLDER):
        raise ConfigError("dataset_args", cfg.dataset_args, f"{{}} for the dataset {cfg.dataset}")
    if cfg.dataset in BUILTIN_DATASETS:
        source = data.load(cfg.dataset, _builtin_source(cfg), cfg.val_size, cfg.train_subset, cfg.seed)
        shape, parts = _in_memory(cfg, source)
    elif cfg.dataset == IMAGE_FOLDER:
        found = _image_folder(cfg)
        shape, parts = _in_memory(cfg, found) if isinstance(found, data.ImageData) else _streamed(cfg, found)
    else:
        datamodule, lightning = _user_data(cfg)
        parts = {
            "loaders": lambda seed, device: Loaders(datamodule=datamodule),
            "steps_per_epoch": lambda world: None,
            "inputs": _datamodule_inputs(cfg, datamodule),
        }
    if model_class is not None:
        return _user_task(cfg, model_class, lightning, datamodule, parts)
    if shape is None:
        shape = _datamodule_shape(cfg, datamodule)
    return _classifier_task(cfg, lightning, shape, parts)


def _datamodule_inputs(cfg: JobConfig, datamodule: Any) -> list[DataInput]:
    """A data module is a run input when it says where its data comes from (a `data_dir` or `source` attribute)."""
    source = getattr(datamodule, "source", None) or getattr(datamodule, "data_dir", None)
    if not source:
        return []
    return [DataInput(cfg.dataset, "training", str(source))]


def _model_class(cfg: JobConfig) -> type | None:
    """A user module's class, checked; None for a built-in or torchvision network, whose name is checked."""
    if cfg.user_module:
        cls = import_class("model", cfg.model)
        if not lightning_api.is_module(cls):
            raise ConfigError("model", cfg.model, "a LightningModule subclass (pytorch_lightning or lightning)")
        return cls
    if cfg.model in BUILTIN_MODELS:
        if json_object("model_args", cfg.model_args):
            raise ConfigError("model_args", cfg.model_args, f"{{}} for the built-in network {cfg.model}")
        return None
    names = torchvision_models()
    if cfg.model not in names:
        raise ConfigError(
            "model",
            cfg.model,
            f"a built-in network ({', '.join(BUILTIN_MODELS)}), one of torchvision's {len(names)} classifiers "
            "(resnet18, mobilenet_v3_small, efficientnet_b0, ...) or a LightningModule's class path",
        )
    return None


def _classifier_task(cfg: JobConfig, lightning: Lightning, shape: ImageShape, parts: dict[str, Any]) -> Task:
    model_args = json_object("model_args", cfg.model_args)
    if cfg.model in BUILTIN_MODELS:
        builder = lambda: builtin_net(cfg.model, shape.channels, shape.classes, shape.size)  # noqa: E731
    else:
        builder = lambda: torchvision_net(cfg.model, shape.channels, shape.classes, model_args)  # noqa: E731
    builder()  # a mistake in the arguments shows now, before any data moves

    def make_module(channels_last: bool) -> Any:
        return classifier(lightning, builder(), cfg.optimizer, cfg.lr, channels_last, cfg.augment)

    return Task(lightning, cfg.model, cfg.dataset, False, make_module, **parts)


def _user_task(cfg: JobConfig, cls: type, lightning: Lightning, datamodule: Any, parts: dict[str, Any]) -> Task:
    found = lightning_api.of_class(cls)
    assert found is not None  # _model_class checked it
    if datamodule is not None and found != lightning:
        raise ConfigError(
            "dataset",
            cfg.dataset,
            f"a data module of the model's package ({found.name}); it derives from {lightning.name}'s",
        )
    kwargs = json_object("model_args", cfg.model_args)
    module = instantiate("model_args", cls, kwargs)
    lr_attr = _lr_attr(cfg, found, module)
    if cfg.auto_lr and getattr(module, "automatic_optimization", True) is False:
        raise ConfigError(
            "auto_lr", "true", f"false for {cls.__qualname__}: the range test needs automatic optimization"
        )
    if cfg.lr_probe:
        raise ConfigError("lr_probe", "true", "false for a user module (the probe scores the built-in classifier)")
    parts = {k: v for k, v in parts.items() if k not in ("probe", "example")}

    def make_module(channels_last: bool) -> Any:
        return instantiate("model_args", cls, kwargs)

    return Task(found, cfg.model, cfg.dataset, True, make_module, lr_attr=lr_attr, **parts)


def _lr_attr(cfg: JobConfig, lightning: Lightning, module: Any) -> str:
    has = lightning.parsing().lightning_hasattr
    tried = (cfg.lr_attr,) if cfg.lr_attr else LR_ATTRS
    for name in tried:
        if has(module, name):
            return name
    raise ConfigError(
        "lr_attr",
        cfg.lr_attr,
        f"the name of {type(module).__qualname__}'s learning-rate attribute (tried {', '.join(tried)} on the "
        "module and its hparams)",
    )
