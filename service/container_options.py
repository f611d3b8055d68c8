"""The options `lr-finder run` and `lr-finder doctor` share, and what they make: the launch spec, the job's command
and the environment's values (read here, at the command line, and only passed on)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mlproject.catalog import FASHION_MNIST_DIR
from service import job_args, spec

DEFAULT_IMAGE = "lr-finder:latest"
DEBIAN_DATASET = Path(FASHION_MNIST_DIR)


class Failure(click.ClickException):
    """click's one-line `Error: message`, exit 1."""


class UsageFailure(Failure):
    """A bad option or argument: exit 2, as click's own usage errors."""

    exit_code = 2


def fail(message: str, code: int = 1) -> click.ClickException:
    """click's one-line `Error: message`, with exit code 1 or (a usage error) 2."""
    return UsageFailure(message) if code == 2 else Failure(message)


def _apply(options: list[Callable[..., Any]], func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(options):
        func = option(func)
    return func


def container_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The container's options, so that doctor checks exactly what run would launch."""
    default_data = str(DEBIAN_DATASET) if DEBIAN_DATASET.is_dir() else ""
    options = [
        click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="The job image (lr-finder build)."),
        click.option("--gpus", default="all", show_default=True, help="all, a count, device=ID[,ID...] or none."),
        click.option(
            "--data",
            default=default_data,
            help="Dataset: a folder (one that exists here, or any path with a slash) or else a docker volume, "
            f"mounted read-only at /data [default: {DEBIAN_DATASET} when present].",
        ),
        click.option(
            "--cache",
            default="",
            help="Folder or volume (as --data) for the job's downloads (the dataset if --data has none), "
            "at ~/.cache in the container.",
        ),
        click.option(
            "--tracking-uri",
            envvar=spec.TRACKING_ENV,
            default="",
            help=f"MLflow tracking server as the container reaches it [default: ${spec.TRACKING_ENV}]; never printed.",
        ),
        click.option(
            "--env",
            "env_extra",
            multiple=True,
            metavar="NAME",
            help="Also pass this variable, by name, "
            "from this environment (credentials MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN always are).",
        ),
        click.option(
            "--network", default="", help="Docker network; host reaches a server on this machine's 127.0.0.1."
        ),
        click.option(
            "--cpus",
            default="",
            metavar="N",
            help="A CPU quota for the container (docker's --cpus); the job sizes its threads to it [default: none].",
        ),
        click.option("--shm-size", default="2g", show_default=True, help="Shared memory (DataLoader workers)."),
        click.option(
            "-v",
            "--verbose",
            is_flag=True,
            help="The job logs debug detail (LR_FINDER_LOG_LEVEL=DEBUG in the container).",
        ),
    ]
    return _apply(options, func)


def job_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The job's parameters, entry point and code folder."""
    options = [
        click.option("-P", "params", multiple=True, metavar="KEY=VALUE", help="A job parameter (MLproject's name)."),
        click.option("--entry-point", "-e", default="main", show_default=True, help="MLproject entry point."),
        click.option(
            "--code",
            default="",
            metavar="DIR",
            help="Your code's folder, mounted read-only at /code and passed as -P code=/code (the job imports "
            "from it).",
        ),
    ]
    return _apply(options, func)


def plan(
    image: str,
    gpus: str,
    data: str,
    cache: str,
    tracking_uri: str,
    env_extra: tuple[str, ...],
    network: str,
    shm_size: str,
    cpus: str = "",
    verbose: bool = False,
    code: str = "",
    name: str = "",
    **job: Any,
) -> tuple[spec.LaunchSpec, job_args.JobCommand, dict[str, str]]:
    """The launch spec, the job's command (job: job_args.job_command's arguments) and the environment's values."""
    environ = spec.job_environ(os.environ, tracking_uri, verbose)
    try:
        names = spec.env_names(environ, env_extra)
        code = _folder("--code", code)
        command = job_args.job_command(**job, code=bool(code))
        sources = {"data": _source("--data", data), "cache": _source("--cache", cache), "code": code}
        job_spec = spec.launch_spec(
            image,
            gpus=gpus,
            shm_size=shm_size,
            cpus=cpus,
            names=names,
            network=network,
            command=command.args,
            entrypoint=command.entrypoint,
            name=name,
            **sources,
        )
    except spec.SpecError as exc:
        raise fail(str(exc), 2) from exc
    return job_spec, command, {n: environ[n] for n in names}


def _source(option: str, value: str) -> str:
    """A mount's source as docker takes it: a folder here as an absolute path, or a volume's name."""
    path = Path(value).expanduser()
    if value and spec.is_host_folder(value, path.is_dir()):
        return _folder(option, value)
    return value


def _folder(option: str, value: str) -> str:
    """A folder here (relative, or under ~), as the absolute path docker binds."""
    if not value:
        return ""
    path = Path(value).expanduser()
    if not path.is_dir():
        raise spec.SpecError(f"{option} {value}: no such folder on this machine")
    return str(path.resolve())
