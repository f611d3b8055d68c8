"""A user's classes by their class path: the `code` folder on the import path, the class imported and checked, and
built from JSON init arguments as LightningCLI builds them."""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from mlproject.config import ConfigError


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
        raise ConfigError(
            param, path, f"an importable class path ({exc}); set code (-P code=, --code) to the folder holding it"
        ) from exc
    except Exception as exc:  # the user's module failed while importing: its error is the answer
        raise ConfigError(param, path, f"a module that imports ({type(exc).__name__}: {exc})") from exc
    found = getattr(module, attr, None)
    if not isinstance(found, type):
        raise ConfigError(param, path, f"a class defined in {module_name} (it has no class {attr})")
    return found


def instantiate(param: str, cls: type, kwargs: dict[str, Any]) -> Any:
    """cls(**kwargs), LightningCLI-style: nested {"class_path", "init_args"} values are built first; an optimizer or
    an LR scheduler among them becomes a factory (its init_args bound, its params or optimizer to come), as
    LightningCLI makes an OptimizerCallable or LRSchedulerCallable argument."""
    built = {key: _nested(param, value) for key, value in kwargs.items()}
    try:
        return cls(**built)
    except TypeError as exc:
        raise ConfigError(param, json.dumps(kwargs), f"init arguments {cls.__qualname__} accepts ({exc})") from exc


def _nested(param: str, value: Any) -> Any:
    if isinstance(value, dict) and "class_path" in value:
        inner = import_class(param, value["class_path"])
        if takes_later(inner):
            return functools.partial(inner, **(value.get("init_args") or {}))
        return instantiate(param, inner, value.get("init_args") or {})
    return value


def takes_later(cls: type) -> bool:
    """An optimizer (built on parameters) or an LR scheduler (on an optimizer): torch's own base classes, by where
    they come from, so that this module needs no torch to import."""
    names = ("Optimizer", "LRScheduler", "ReduceLROnPlateau")
    return any(base.__module__.startswith("torch.optim") and base.__name__ in names for base in cls.__mro__)
