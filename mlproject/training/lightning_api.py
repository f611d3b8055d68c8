"""Lightning's two packages, `pytorch_lightning` and `lightning.pytorch`, behind one handle.

They have separate class hierarchies: a Trainer of one rejects the modules, data modules, callbacks and plugins of
the other. The job drives each user module with its own package, so the job's callbacks and its built-in
classifier are made for whichever package is in use, from package-neutral hook classes.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from mlproject import logs

PACKAGES = ("pytorch_lightning", "lightning.pytorch")


@dataclass(frozen=True)
class Lightning:
    """One of the two packages, with the classes the job uses from it."""

    name: str

    @property
    def pl(self) -> ModuleType:
        package = importlib.import_module(self.name)
        for name in ("lightning", self.name):  # each adds a console handler of its own at import
            logs.adopt(name)
        return package

    @property
    def LightningModule(self) -> type:  # noqa: N802 - the class's own name
        return self.pl.LightningModule

    @property
    def LightningDataModule(self) -> type:  # noqa: N802
        return self.pl.LightningDataModule

    def trainer(self, **kwargs: Any) -> Any:
        return self.pl.Trainer(**kwargs)

    def tuner(self, trainer: Any) -> Any:
        return importlib.import_module(f"{self.name}.tuner").Tuner(trainer)

    def parsing(self) -> ModuleType:
        """lightning_hasattr / lightning_getattr / lightning_setattr: an attribute of a module or its hparams."""
        return importlib.import_module(f"{self.name}.utilities.parsing")

    def make(self, hooks: type, base: str, *args: Any, **kwargs: Any) -> Any:
        """An instance of `hooks` (package-neutral methods) as a subclass of this package's `base`, a dotted path
        below the package such as "Callback", "callbacks.Checkpoint" or "plugins.CheckpointIO"."""
        return _bind(self.name, hooks, base)(*args, **kwargs)


@functools.cache
def _bind(package: str, hooks: type, base: str) -> type:
    module, _, attr = base.rpartition(".")
    parent = getattr(importlib.import_module(f"{package}.{module}" if module else package), attr)
    return type(hooks.__name__, (hooks, parent), {"__module__": hooks.__module__, "__qualname__": hooks.__qualname__})


DEFAULT = Lightning("pytorch_lightning")


def of_class(cls: type) -> Lightning | None:
    """The package `cls` derives from (a LightningModule or LightningDataModule), or None for neither."""
    for name in PACKAGES:
        try:
            pl = importlib.import_module(name)
        except ImportError:  # lightning is optional: only users who write against it have it
            continue
        if issubclass(cls, (pl.LightningModule, pl.LightningDataModule)):
            return Lightning(name)
    return None


def is_module(cls: type) -> bool:
    found = of_class(cls)
    return found is not None and issubclass(cls, found.LightningModule)


def is_datamodule(cls: type) -> bool:
    found = of_class(cls)
    return found is not None and issubclass(cls, found.LightningDataModule)


def defines(cls: type, hook: str) -> bool:
    """Whether `cls` (a LightningModule or LightningDataModule) defines `hook` itself, or inherits it from a class
    other than Lightning's own base: told apart by where the function comes from, not by a package's name, so a
    class of Lightning's demos or of a package named lightning_* counts as the user's."""
    found = of_class(cls)
    if found is None:
        return callable(getattr(cls, hook, None))
    base = found.LightningDataModule if issubclass(cls, found.LightningDataModule) else found.LightningModule
    own, default = getattr(cls, hook, None), getattr(base, hook, None)
    return own is not None and own is not default
