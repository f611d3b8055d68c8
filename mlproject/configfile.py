"""LightningCLI's YAML configs as job parameters, so a file a team already uses runs as it is: `model` and `data`
as class_path + init_args (or a bare class path), the `trainer` settings the job has, `seed_everything`, and
top-level keys for any job parameter."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from mlproject.config import ConfigError

log = logging.getLogger(__name__)

TRAINER_KEYS = {
    "max_epochs": "epochs",
    "accelerator": "accelerator",
    "devices": "devices",
    "num_nodes": "num_nodes",
    "precision": "precision",
}
# LightningCLI keys that change nothing the job does: Lightning's own logger, callbacks and checkpoints are off
# (the job owns the run), and a checkpoint to start from is `resume`'s business.
IGNORED = ("ckpt_path", "verbose", "print_config")
COMPONENTS = {"model": ("model", "model_args"), "data": ("dataset", "dataset_args")}


def load(path: str, fields: Iterable[str]) -> dict[str, Any]:
    """The job parameters a LightningCLI config sets; a ConfigError naming `config` for anything else."""
    file = Path(path).expanduser()
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError("config", path, f"a readable YAML file ({exc.strerror or exc})") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("config", path, f"valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(doc, dict):
        raise ConfigError("config", path, "a mapping in LightningCLI's format (model:, data:, trainer:, ...)")
    known = set(fields)
    params: dict[str, Any] = {}
    for key, value in doc.items():
        if key in COMPONENTS:
            params |= _component(path, key, value)
        elif key == "trainer":
            params |= _trainer(path, value)
        elif key == "seed_everything":
            if isinstance(value, int) and not isinstance(value, bool):
                params["seed"] = value
        elif key in known:
            params[key] = value
        elif key not in IGNORED:
            raise ConfigError(
                "config",
                path,
                f"LightningCLI's keys (model, data, trainer, seed_everything) or job parameters; {key!r} is neither",
            )
    return params


def _component(path: str, key: str, value: Any) -> dict[str, Any]:
    """model: / data: as a class path, or {class_path, init_args, dict_kwargs}."""
    name, args = COMPONENTS[key]
    if isinstance(value, str):
        return {name: value}
    if not isinstance(value, dict) or not isinstance(value.get("class_path"), str):
        raise ConfigError("config", path, f"{key}: a class path or a mapping with class_path and init_args")
    init_args = {**(value.get("init_args") or {}), **(value.get("dict_kwargs") or {})}
    return {name: value["class_path"], args: json.dumps(init_args, sort_keys=True)}


def _trainer(path: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError("config", path, "trainer: a mapping of Trainer arguments")
    ignored = sorted(k for k in value if k not in TRAINER_KEYS)
    if ignored:
        log.warning("config %s: trainer settings the job decides itself are left out: %s", path, ", ".join(ignored))
    return {TRAINER_KEYS[k]: v for k, v in value.items() if k in TRAINER_KEYS and v is not None}


def merge(from_file: dict[str, Any], given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Values given explicitly win over the file; a value equal to its default counts as not given (`mlflow run`
    passes every parameter, given or not)."""
    explicit = {k: v for k, v in given.items() if v != defaults.get(k)}
    return {**given, **from_file, **explicit}
