"""What a job trains: a (module, data) pair from three model providers (the built-in networks, torchvision's
classifiers, a LightningModule's class path) and three data providers (the built-in datasets, an image folder, a
LightningDataModule's class path). Everything the user named is resolved and checked here, before training."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlproject.catalog import BUILTIN_DATASETS
from mlproject.config import (
    BUILTIN_LR,
    BUILTIN_MODELS,
    IMAGE_FOLDER,
    LR_FREE,
    MODULE_DATA,
    OPTIMIZERS,
    ConfigError,
    JobConfig,
    is_class_path,
    json_object,
)
from mlproject.training import idx, lightning_api, recipe, sources
from mlproject.training.batches import ImageData
from mlproject.training.classifier import classifier
from mlproject.training.classpaths import import_class, instantiate
from mlproject.training.lightning_api import Lightning
from mlproject.training.networks import builtin_net, torchvision_models, torchvision_net
from mlproject.training.optimizers import LR_ATTRS, LRTarget, find_target, reach, unreached
from mlproject.training.sources import DataSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """A module factory and its data, with what the job needs to know of both."""

    lightning: Lightning
    user_module: bool
    make_module: Callable[[bool], Any]  # (channels_last) -> a fresh module, built under the caller's seed
    data: DataSource
    dataset: str  # the data as resolved: cfg.dataset, or "module" for a module's own dataloaders
    lr_target: LRTarget | None  # where the job sets the LR; None: the module keeps its own (it has nowhere else)
    own_lr: float | None  # the LR the module builds its optimizer at as it comes; None: unknown before its fit
    automatic: bool = True  # automatic optimization: the loss comes back from training_step
    callbacks: Callable[[], list[Any]] = list  # fresh instances of the callbacks the fit adds (cfg.callbacks)
    trainer_args: dict[str, Any] = field(default_factory=dict)  # for every Trainer: clipping, accumulation, ...

    def module(self, seed: int, channels_last: bool) -> Any:
        """A fresh module under `seed`: the range test's copy, the trials and the fit start from the same weights."""
        self.lightning.pl.seed_everything(seed, workers=True, verbose=False)
        return self.make_module(channels_last)

    def set_lr(self, module: Any, lr: float) -> None:
        """The LR at the module's target, where its configure_optimizers reads it (build() checked it has one)."""
        if self.lr_target is None:
            raise ConfigError("lr_attr", "", f"the name of {type(module).__qualname__}'s learning-rate attribute")
        self.lr_target.set(module, lr)

    def fallback_lr(self, cfg: JobConfig) -> float:
        """The LR a range test with no answer falls back to: lr, else the module's own, else BUILTIN_LR."""
        return cfg.lr or self.own_lr or BUILTIN_LR

    def resolved(self, cfg: JobConfig) -> JobConfig:
        """cfg with what the job resolved for it: the data it trains on."""
        return cfg.replace(dataset=self.dataset)


def check(cfg: JobConfig) -> None:
    """The names alone, without reading data: what a launcher checks before it starts any process."""
    _model_class(cfg)
    if is_class_path(cfg.dataset):
        cls = import_class("dataset", cfg.dataset)
        if not lightning_api.is_datamodule(cls):
            raise ConfigError("dataset", cfg.dataset, "a LightningDataModule subclass (pytorch_lightning or lightning)")
    elif cfg.dataset == IMAGE_FOLDER and not Path(cfg.data_dir).expanduser().is_dir():
        raise ConfigError("data_dir", cfg.data_dir, "the image folder (train/<class>/<image>, val/ and test/ optional)")


def build(cfg: JobConfig) -> Task:
    """Resolve the model and the dataset cfg names into a Task; every mistake is a ConfigError or DataError. The
    names are checked before any data is read."""
    model_class = _model_class(cfg)
    datamodule, lightning, shape = None, lightning_api.DEFAULT, None
    if cfg.dataset_args.strip() not in ("", "{}") and (cfg.dataset in BUILTIN_DATASETS or cfg.dataset == IMAGE_FOLDER):
        raise ConfigError("dataset_args", cfg.dataset_args, f"{{}} for the dataset {cfg.dataset}")
    if cfg.dataset in BUILTIN_DATASETS and not _brings_its_own(cfg, model_class):
        loaded = idx.load(cfg.dataset, sources.builtin_source(cfg), cfg.val_size, cfg.train_subset, cfg.seed)
        shape, source = sources.in_memory(cfg, loaded)
    elif cfg.dataset == IMAGE_FOLDER:
        folder = sources.image_folder(cfg)
        if isinstance(folder, ImageData):
            shape, source = sources.in_memory(cfg, folder)
        else:
            shape, source = sources.streamed(cfg, folder)
    elif cfg.dataset == MODULE_DATA or _brings_its_own(cfg, model_class):
        source = sources.module_source(cfg, model_class)
    else:
        datamodule, lightning = sources.user_data(cfg)
        source = sources.datamodule_source(cfg, datamodule)
    if model_class is not None:
        return _user_task(cfg, model_class, lightning, datamodule, source)
    if shape is None:
        shape = sources.datamodule_shape(cfg, datamodule)
    return _classifier_task(cfg, lightning, shape, source)


def _brings_its_own(cfg: JobConfig, model_class: type | None) -> bool:
    """A user module that defines its own train_dataloader, given no data of another kind (dataset left at its
    default): it trains on its own loaders, not on Fashion-MNIST."""
    default = JobConfig().dataset
    return model_class is not None and cfg.dataset == default and lightning_api.defines(model_class, "train_dataloader")


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
    setup = recipe.setup(cfg, lightning)
    named = cfg.optimizer if cfg.optimizer in OPTIMIZERS else OPTIMIZERS[0]  # a class path: setup wires it in

    default = LR_FREE.get(cfg.optimizer, BUILTIN_LR)  # an LR-free optimizer's: its authors' default
    built_at = cfg.lr or default

    def make_module(channels_last: bool) -> Any:
        return setup(classifier(lightning, builder(), named, built_at, channels_last, cfg.augment))

    target: LRTarget | None = LRTarget(lightning, "lr")
    own_lr: float | None = default
    if is_class_path(cfg.optimizer):
        target, own_lr = _lr_target(cfg, lightning, make_module(False))
    callbacks, trainer_args = recipe.trainer_parts(cfg, lightning)
    return Task(lightning, False, make_module, source, cfg.dataset, target, own_lr, True, callbacks, trainer_args)


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
    setup = recipe.setup(cfg, found)
    module = setup(instantiate("model_args", cls, kwargs))
    automatic = getattr(module, "automatic_optimization", True) is not False
    if cfg.auto_lr and not automatic:
        raise ConfigError(
            "auto_lr", "true", f"false for {cls.__qualname__}: the range test needs automatic optimization"
        )
    if cfg.lr_probe:
        raise ConfigError("lr_probe", "true", "false for a user module (the probe scores the built-in classifier)")
    target, own_lr = _lr_target(cfg, found, module)

    def make_module(channels_last: bool) -> Any:
        return setup(instantiate("model_args", cls, kwargs))

    # lr_probe scores the built-in classifier's loss: no probe for a module of the user's.
    data = replace(source, probe=None)
    dataset = MODULE_DATA if source.own else cfg.dataset
    callbacks, trainer_args = recipe.trainer_parts(cfg, found)
    return Task(found, True, make_module, data, dataset, target, own_lr, automatic, callbacks, trainer_args)


def _lr_target(cfg: JobConfig, lightning: Lightning, module: Any) -> tuple[LRTarget | None, float | None]:
    """Where the job sets the module's LR, checked by building its optimizer (`module` is spent), and its own LR.
    A module the job must give an LR (auto_lr, or lr given) and that has nowhere to take it is refused."""
    owner = type(module).__qualname__
    target = find_target(lightning, module, cfg.lr_attr)
    needs = cfg.auto_lr or cfg.lr > 0
    if target is None and needs:
        tried = cfg.lr_attr or ", ".join(LR_ATTRS)
        raise ConfigError(
            "lr_attr",
            cfg.lr_attr,
            f"the name of {owner}'s learning-rate attribute or optimizer factory (tried {tried} on the module and "
            "its hparams); or let it train at its own LR: auto_lr=false and lr=0",
        )
    own = target.read(module) if target is not None and not target.factory else None
    found = reach(module, target)
    if needs and found.follows is False and found.probe is not None and found.built_at is not None:
        raise unreached(owner, target, found.probe, found.built_at)
    if found.why_unknown:
        why = found.why_unknown
        log.info("%s.configure_optimizers needs a Trainer (%s): its LR is checked at the fit's start", owner, why)
    return target, found.own_lr if found.own_lr is not None else own
