"""What makes a fresh module the one the job trains, checked once when the task is built: LightningCLI's optimizer
and lr_scheduler sections wired into its configure_optimizers, a checkpoint's weights, the callbacks the fit adds and
the arguments every Trainer of the job gets (clipping, accumulation, trainer_args)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from mlproject.config import ConfigError, JobConfig, callback_specs, is_class_path, json_object
from mlproject.training.classpaths import import_class, instantiate, takes_later
from mlproject.training.lightning_api import Lightning
from mlproject.training.optimizers import configure_from


def setup(cfg: JobConfig, lightning: Lightning) -> Callable[[Any], Any]:
    """What makes a fresh module the one the job trains: LightningCLI's optimizer and lr_scheduler sections wired
    into its configure_optimizers, and its checkpoint's weights (ckpt_path). Each is checked here, once."""
    optimizer = factory("optimizer", cfg.optimizer, cfg.optimizer_args) if is_class_path(cfg.optimizer) else None
    scheduler = factory("lr_scheduler", cfg.lr_scheduler, cfg.lr_scheduler_args) if cfg.lr_scheduler else None
    weights = weights_of(cfg.ckpt_path) if cfg.ckpt_path else None

    def setup(module: Any) -> Any:
        if optimizer is not None or scheduler is not None:
            configure_from(module, optimizer, scheduler, cfg.monitor)
        if weights is not None:
            try:
                module.load_state_dict(weights)
            except RuntimeError as exc:  # keys or shapes of another model
                first = str(exc).strip().splitlines()[0]
                raise ConfigError("ckpt_path", cfg.ckpt_path, f"a checkpoint of this model ({first})") from exc
        return module

    return setup


def factory(param: str, path: str, args: str) -> Any:
    cls = import_class(param, path)
    if not takes_later(cls):
        kind = "an optimizer (torch.optim.Optimizer)" if param == "optimizer" else "an LR scheduler"
        raise ConfigError(param, path, f"the class path of {kind}")
    return functools.partial(cls, **json_object(f"{param}_args", args))


def weights_of(path: str) -> dict[str, Any]:
    """The state_dict of a Lightning checkpoint, read on the CPU (a checkpoint is code: it is the user's own)."""
    try:
        found = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ConfigError("ckpt_path", path, f"a readable Lightning checkpoint ({exc})") from exc
    if not isinstance(found, dict) or not isinstance(found.get("state_dict"), dict):
        raise ConfigError("ckpt_path", path, "a Lightning checkpoint (a file Trainer.save_checkpoint wrote)")
    return found["state_dict"]


def trainer_parts(cfg: JobConfig, lightning: Lightning) -> tuple[Callable[[], list[Any]], dict[str, Any]]:
    """The fit's extra callbacks (built once now, so that a mistake shows before training) and the arguments every
    Trainer of the job gets."""
    specs = callback_specs(cfg.callbacks)

    def callbacks() -> list[Any]:
        made = [instantiate("callbacks", import_class("callbacks", s["class_path"]), s.get("init_args") or {})
                for s in specs]  # fmt: skip
        wrong = [type(c).__qualname__ for c in made if not isinstance(c, lightning.pl.Callback)]
        if wrong:
            raise ConfigError("callbacks", cfg.callbacks, f"{lightning.name} Callbacks ({', '.join(wrong)} are not)")
        return made

    callbacks()
    args = json_object("trainer_args", cfg.trainer_args)
    if cfg.gradient_clip_val > 0:
        args["gradient_clip_val"] = cfg.gradient_clip_val
    if cfg.accumulate_grad_batches > 1:
        args["accumulate_grad_batches"] = cfg.accumulate_grad_batches
    return callbacks, args
