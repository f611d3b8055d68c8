"""What `lr-finder deploy` runs, checked: the image, the sizes, the names and the job's parameters (against
MLproject), and the job's command line they make."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Params = tuple[tuple[str, str], ...]  # -P key=value pairs, in order

# MLproject entry point -> the job's command (python -m mlproject COMMAND).
ENTRY_COMMANDS = {"main": "train", "lr_find": "lr-find", "compare": "compare"}
# What each entry point runs with unless -P says otherwise: a cluster job is there to train with the suggestion.
BASE_PARAMS: dict[str, dict[str, str]] = {"main": {"auto_lr": "true"}, "lr_find": {}, "compare": {}}
# Set from the hardware options, so that processes, GPUs and the job's own count cannot disagree.
RESERVED = {"accelerator": "--gpus-per-node", "devices": "--gpus-per-node", "num_nodes": "--nodes"}
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,48}[a-z0-9])?")  # room for the pods' -<index>-<suffix>
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # a Secret's or a claim's name
_IMAGE = re.compile(r"[a-z0-9][a-z0-9._/:-]*(:[\w][\w.-]{0,127})?(@sha256:[0-9a-f]{64})?")
_SLURM_IMAGE = re.compile(r"[\w./:#@+-]+")  # a squashfs path or a pyxis reference (registry#image:tag)
_SLURM_TIME = re.compile(r"\d+(:\d{2}){0,2}|\d+-\d{1,2}(:\d{2}){0,2}")  # Slurm's six forms of --time
_PARAM_KEY = re.compile(r"[a-z][a-z0-9_]*")


class DeployError(ValueError):
    """A value the files cannot be written with: which option (or file) to change, and how."""

    def __init__(self, option: str, detail: str) -> None:
        self.option, self.detail = option, detail
        super().__init__(f"{option}: {detail}")


@dataclass(frozen=True)
class Target:
    """Where and what to run: the values every template is filled in with."""

    image: str
    nodes: int = 1
    gpus: int = 1  # per node
    experiment: str = "lr-finder"
    secret: str = "lr-finder-tracking"
    name: str = "lr-finder"
    namespace: str = "default"
    entry: str = "main"
    params: Params = ()  # checked against MLproject
    data_claim: str = ""


def check_name(option: str, value: str, subdomain: bool = False) -> str:
    """A Kubernetes object name: a DNS label (Job, Service, namespace) or subdomain (Secret, claim)."""
    if not (_DNS_SUBDOMAIN if subdomain else _DNS_LABEL).fullmatch(value):
        raise DeployError(option, f"{value!r}: lower-case letters, digits and '-' (and '.' in a Secret's name)")
    return value


def check_image(option: str, value: str, slurm: bool = False) -> str:
    """An image reference (a squashfs path or pyxis reference for Slurm), safe to write into YAML or bash."""
    if not (_SLURM_IMAGE if slurm else _IMAGE).fullmatch(value):
        example = "/shared/lr-finder.sqsh or host#lr-finder:tag" if slurm else "registry.example.com/lr-finder:tag"
        raise DeployError(option, f"{value!r}: pass an image reference such as {example}")
    return value


def check_time(option: str, value: str) -> str:
    """Slurm's --time: minutes[:seconds], hours:minutes:seconds, or days-hours[:minutes[:seconds]]."""
    if not _SLURM_TIME.fullmatch(value):
        raise DeployError(option, f"{value!r}: pass HH:MM:SS or D-HH:MM:SS, e.g. 04:00:00")
    return value


def check_params(items: Iterable[str], entry: str, declared: Mapping[str, Mapping[str, Any]]) -> Params:
    """-P key=value against the entry point's MLproject parameters: known, not set elsewhere, of the right type."""
    pairs: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _PARAM_KEY.fullmatch(key) or "\n" in value:
            raise DeployError("-P", f"{item!r}: expected key=value, e.g. -P epochs=8")
        if key in RESERVED:
            raise DeployError("-P", f"{key}: set by {RESERVED[key]}")
        if key not in declared:
            raise DeployError("-P", f"{key}: not a parameter of entry point {entry} (see MLproject)")
        kind = declared[key].get("type", "string")
        try:
            {"int": int, "float": float}.get(kind, str)(value)
        except ValueError:
            raise DeployError("-P", f"{item!r}: {key} is a{'n' if kind == 'int' else ''} {kind} in MLproject") from None
        pairs.append((key, value))
    return tuple(pairs)


def param_args(target: Target) -> list[str]:
    """The entry's parameters as the job's options (x_y -> --x-y), the base ones first."""
    values = {**BASE_PARAMS[target.entry], **dict(target.params)}
    return [word for key, value in values.items() for word in ("--" + key.replace("_", "-"), value)]


def job_args(target: Target) -> list[str]:
    """The job's command line after `-m mlproject`: the entry's command, its parameters, then the hardware."""
    hardware = ["--accelerator", "gpu", "--devices", str(target.gpus), "--num-nodes", str(target.nodes)]
    return [ENTRY_COMMANDS[target.entry], *param_args(target), *hardware]
