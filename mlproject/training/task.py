"""What a job trains: a (module, data) pair from three model providers (the built-in networks, torchvision's
classifiers, a LightningModule's class path) and three data providers (the built-in datasets, an image folder, a
LightningDataModule's class path). Everything the user named is resolved and checked here, before training."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlproject.catalog import BUILTIN_DATASETS
from mlproject.config import BUILTIN_MODELS, IMAGE_FOLDER, ConfigError, JobConfig, is_class_path, json_object
from mlproject.errors import DataError
from mlproject.training import idx, images, lightning_api, sources
from mlproject.training.batches import ImageData
from mlproject.training.classifier import classifier
from mlproject.training.classpaths import import_class, instantiate
from mlproject.training.lightning_api import Lightning
from mlproject.training.networks import builtin_net, torchvision_models, torchvision_net
from mlproject.training.sources import DataSource

log = logging.getLogger(__name__)

LR_ATTRS = ("lr", "learning_rate")  # where Lightning's own finder looks


@dataclass(frozen=True)
class Task:
    """A module factory and its data, with what the job needs to know of both."""

    lightning: Lightning
    user_module: bool
    make_module: Callable[[bool], Any]  # (channels_last) -> a fresh module, built under the caller's seed
    data: DataSource
    lr_attr: str = "lr"

    def module(self, seed: int, channels_last: bool) -> Any:
        """A fresh module under `seed`: the range test's copy, the trials and the fit start from the same weights."""
        self.lightning.pl.seed_everything(seed, workers=True, verbose=False)
        return self.make_module(channels_last)


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
        source = sources.builtin_source(cfg)
        found = idx.find_dir(source.candidates)
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
    datamodule, lightning, shape = None, lightning_api.DEFAULT, None
    if cfg.dataset_args.strip() not in ("", "{}") and (cfg.dataset in BUILTIN_DATASETS or cfg.dataset == IMAGE_FOLDER):
        raise ConfigError("dataset_args", cfg.dataset_args, f"{{}} for the dataset {cfg.dataset}")
    if cfg.dataset in BUILTIN_DATASETS:
        loaded = idx.load(cfg.dataset, sources.builtin_source(cfg), cfg.val_size, cfg.train_subset, cfg.seed)
        shape, source = sources.in_memory(cfg, loaded)
    elif cfg.dataset == IMAGE_FOLDER:
        folder = sources.image_folder(cfg)
        if isinstance(folder, ImageData):
            shape, source = sources.in_memory(cfg, folder)
        else:
            shape, source = sources.streamed(cfg, folder)
    else:
        datamodule, lightning = sources.user_data(cfg)
        source = sources.datamodule_source(cfg, datamodule)
    if model_class is not None:
        return _user_task(cfg, model_class, lightning, datamodule, source)
    if shape is None:
        shape = sources.datamodule_shape(cfg, datamodule)
    return _classifier_task(cfg, lightning, shape, source)


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


def _classifier_task(cfg: JobConfig, lightning: Lightning, shape: sources.ImageShape, source: DataSource) -> Task:
    model_args = json_object("model_args", cfg.model_args)
    if cfg.model in BUILTIN_MODELS:
        builder = lambda: builtin_net(cfg.model, shape.channels, shape.classes, shape.size)  # noqa: E731
    else:
        builder = lambda: torchvision_net(cfg.model, shape.channels, shape.classes, model_args)  # noqa: E731
    builder()  # a mistake in the arguments shows now, before any data moves

    def make_module(channels_last: bool) -> Any:
        return classifier(lightning, builder(), cfg.optimizer, cfg.lr, channels_last, cfg.augment)

    return Task(lightning, False, make_module, source)


def _user_task(cfg: JobConfig, cls: type, lightning: Lightning, datamodule: Any, source: DataSource) -> Task:
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

    def make_module(channels_last: bool) -> Any:
        return instantiate("model_args", cls, kwargs)

    # The probe and the example input are the built-in classifier's: a user module's input may be anything.
    return Task(found, True, make_module, replace(source, probe=None, example=None), lr_attr=lr_attr)


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
