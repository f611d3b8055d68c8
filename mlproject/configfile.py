"""LightningCLI's YAML configs as job parameters, as LightningCLI writes them (`--print_config`): `model` and `data`
(class_path + init_args, or a bare class path), `optimizer` and `lr_scheduler`, the `trainer` section, `ckpt_path`,
`seed_everything`, and top-level keys for any job parameter. What the job cannot honour is refused, every such key
in one message; what only changes what Lightning shows or writes is left out, said once."""

from __future__ import annotations

import inspect
import json
import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from mlproject.config import TRAINER_CONFLICTS, TRAINER_FIELDS, TRAINER_SHOWN, ConfigError

log = logging.getLogger(__name__)

COMPONENTS = {"model": ("model", "model_args"), "data": ("dataset", "dataset_args")}
SECTIONS = {"optimizer": ("optimizer", "optimizer_args"), "lr_scheduler": ("lr_scheduler", "lr_scheduler_args")}
# A config LightningCLI prints is a few kilobytes: these bound what the job reads (the file, and its values with
# every YAML alias expanded, so that a billion-laughs document cannot fill the memory when the job records it).
MAX_BYTES = 1_000_000
MAX_VALUES = 100_000
IGNORED = ("weights_only", "verbose", "print_config")  # how LightningCLI itself loads and prints: nothing to train
ACCELERATORS = {"auto": "auto", "cpu": "cpu", "gpu": "gpu", "cuda": "gpu"}
PRECISIONS = {
    "32": "32-true", "32-true": "32-true", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "16": "16-mixed",
    "16-mixed": "16-mixed",
}  # fmt: skip


def load(path: str, fields: Iterable[str]) -> dict[str, Any]:
    """The job parameters a LightningCLI config sets; one ConfigError naming `config` and everything it cannot take."""
    doc = _read(path)
    known = set(fields)
    params: dict[str, Any] = {}
    refused: list[str] = []
    for key, value in doc.items():
        if key in COMPONENTS:
            params |= _component(path, key, value, COMPONENTS[key])
        elif key in SECTIONS:
            params |= _component(path, key, value, SECTIONS[key]) if value is not None else {}
        elif key == "trainer":
            params |= _trainer(path, value or {}, refused)
        elif key == "seed_everything":
            params |= _seed(value)
        elif key == "ckpt_path":
            params |= {"ckpt_path": str(value)} if value else {}
        elif key in known:
            params[key] = value
        elif key not in IGNORED:
            refused.append(f"{key} (neither LightningCLI's nor a job parameter)")
    if refused:
        raise ConfigError("config", path, f"settings the job can take; it cannot take {'; '.join(refused)}")
    return params


def _read(path: str) -> dict[str, Any]:
    """The file's mapping, read within bounds: MAX_BYTES of UTF-8 text, whose values, aliases expanded, hold at most
    MAX_VALUES values (a config of anchors that expand a billion-fold, or refer to themselves, is refused)."""
    try:
        with Path(path).expanduser().open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError("config", path, f"a readable YAML file ({exc.strerror or exc})") from exc
    if len(raw) > MAX_BYTES:
        raise ConfigError("config", path, f"a YAML file of at most {MAX_BYTES // 1_000_000} MB")
    try:
        doc = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError("config", path, f"a YAML file of UTF-8 text (byte {exc.start} is not)") from exc
    except yaml.YAMLError as exc:
        raise ConfigError("config", path, f"valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(doc, dict):
        raise ConfigError("config", path, "a mapping in LightningCLI's format (model:, data:, trainer:, ...)")
    if _expanded_size(doc) > MAX_VALUES:
        accepted = (
            f"a config of at most {MAX_VALUES:,} values with its aliases expanded (and none that contains itself)"
        )
        raise ConfigError("config", path, accepted)
    return doc


def _expanded_size(doc: Any) -> int:
    """How many values the document holds with every alias expanded, counted up to MAX_VALUES + 1 (a value that
    contains itself counts without end)."""
    count, todo = 0, [doc]
    while todo and count <= MAX_VALUES:
        value = todo.pop()
        count += 1
        if isinstance(value, dict):
            todo.extend(value.keys())
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
    return count


def _component(path: str, key: str, value: Any, names: tuple[str, str]) -> dict[str, Any]:
    """model: / data: / optimizer: / lr_scheduler: as a class path, or {class_path, init_args, dict_kwargs}."""
    name, args = names
    if isinstance(value, str):
        return {name: value}
    if not isinstance(value, dict) or not isinstance(value.get("class_path"), str):
        raise ConfigError("config", path, f"{key}: a class path or a mapping with class_path and init_args")
    init_args = {**(value.get("init_args") or {}), **(value.get("dict_kwargs") or {})}
    return {name: value["class_path"], args: json.dumps(init_args, sort_keys=True)}


def _seed(value: Any) -> dict[str, Any]:
    """An int seeds; true asks for a random seed, drawn here and recorded as the job's (as LightningCLI does)."""
    if isinstance(value, bool):
        return {"seed": random.SystemRandom().randrange(2**32)} if value else {}
    return {"seed": value} if isinstance(value, int) else {}


def _trainer(path: str, section: Any, refused: list[str]) -> dict[str, Any]:
    """The trainer: section: keys at the Trainer's own default change nothing; keys with a job parameter become it;
    keys that change how the job trains, which it decides itself, are refused; keys that change only what Lightning
    shows or writes are left out; the rest pass to the fit's Trainer as trainer_args."""
    if not isinstance(section, dict):
        raise ConfigError("config", path, "trainer: a mapping of Trainer arguments")
    defaults = _trainer_defaults()
    params: dict[str, Any] = {}
    passed: dict[str, Any] = {}
    shown: list[str] = []
    for key, value in section.items():
        if key in defaults and value == defaults[key]:
            continue
        if key in TRAINER_FIELDS:
            params |= _field(key, value, refused)
        elif key in TRAINER_CONFLICTS:
            refused.append(f"trainer.{key}={value!r} (the job decides it)")
        elif key in TRAINER_SHOWN:
            shown.append(key)
        elif key in defaults:
            passed[key] = value
        else:
            refused.append(f"trainer.{key} (no Trainer argument)")
    if shown:
        left = ", ".join(f"trainer.{key}" for key in shown)
        log.info("config %s: left to the job, which keeps its run in MLflow: %s", path, left)
    return params | ({"trainer_args": json.dumps(passed, sort_keys=True)} if passed else {})


def _field(key: str, value: Any, refused: list[str]) -> dict[str, Any]:
    """A trainer: key with a job parameter, in Lightning's spellings; what the job has no spelling for is refused."""
    name = TRAINER_FIELDS[key]
    if key == "accelerator" and str(value).lower() in ACCELERATORS:
        return {name: ACCELERATORS[str(value).lower()]}
    if key == "precision" and str(value) in PRECISIONS:
        return {name: PRECISIONS[str(value)]}
    if key == "devices":
        count = len(value) if isinstance(value, list) else _count(value)
        if count:
            return {name: count}
    if key == "callbacks":
        return {name: json.dumps(value if isinstance(value, list) else [value], sort_keys=True)}
    if key in ("max_epochs", "num_nodes", "accumulate_grad_batches") and isinstance(value, int) and value > 0:
        return {name: value}
    if key == "gradient_clip_val" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return {name: float(value)}
    refused.append(f"trainer.{key}={value!r} (the job takes {_spellings(key)})")
    return {}


def _count(value: Any) -> int:
    """devices as a count: 2, "2", "0,1" (indices); 0 where it names none ("auto" and -1 ask for every device)."""
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    parts = [p for p in text.split(",") if p.strip()]
    return len(parts) if parts and all(p.strip().isdigit() for p in parts) else 0


def _spellings(key: str) -> str:
    return {
        "accelerator": "auto, cpu, gpu or cuda",
        "precision": ", ".join(PRECISIONS),
        "devices": "a count, or a list of device indices",
    }.get(key, "a number > 0")


def _trainer_defaults() -> dict[str, Any]:
    """The Trainer's own defaults, by argument: a printed config holds every one of them."""
    import pytorch_lightning  # a config file names Lightning's classes: the job imports it next anyway

    return {
        name: param.default
        for name, param in inspect.signature(pytorch_lightning.Trainer.__init__).parameters.items()
        if param.default is not inspect.Parameter.empty
    }


def merge(from_file: dict[str, Any], given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Values given explicitly win over the file; a value equal to its default counts as not given (`mlflow run`
    passes every parameter, given or not)."""
    explicit = {k: v for k, v in given.items() if v != defaults.get(k)}
    return {**given, **from_file, **explicit}
