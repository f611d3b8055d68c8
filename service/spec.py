"""The job container, decided without docker: command-line choices -> a LaunchSpec (image, GPUs, mounts,
environment by name), and the pure checks around it; the job's own arguments are job_args'."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from mlproject.logs import LEVEL_ENV
from mlproject.record.environment import CREDENTIAL_ENV

DATA_TARGET = "/data"  # the image's dataset volume (FASHION_MNIST_DIR)
CACHE_TARGET = "/home/lrfinder/.cache"  # the job downloads into ~/.cache/mlproject when /data is empty
CODE_TARGET = "/code"  # the user's code, which the job puts on its import path (-P code=/code)
TRACKING_ENV = "MLFLOW_TRACKING_URI"
# Passed by name as the credentials are, but no secret: scrub must not mask its value (DEBUG) in the job's log.
PLAIN_ENV = (LEVEL_ENV,)
LABEL = "org.lr-finder.job"  # marks containers this service launched
ENGINE_HINT = "install Docker (apt-get install docker.io) and start it (systemctl start docker), or set DOCKER_HOST"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]+")  # docker's rule for a named volume


class SpecError(ValueError):
    """The options cannot make a launchable job; the message names the option and what to pass instead."""


@dataclass(frozen=True)
class GpuRequest:
    """docker's --gpus: count -1 is all, 0 none; device_ids picks GPUs by index or UUID."""

    count: int = -1
    device_ids: tuple[str, ...] = ()

    @property
    def wanted(self) -> bool:
        return self.count != 0 or bool(self.device_ids)

    def describe(self) -> str:
        if self.device_ids:
            return "device " + ",".join(self.device_ids)
        return {-1: "all", 0: "none"}.get(self.count, str(self.count))


@dataclass(frozen=True)
class Mount:
    """A host folder (an absolute path) or a named docker volume, mounted at target."""

    source: str
    target: str
    read_only: bool

    @property
    def is_bind(self) -> bool:
        return self.source.startswith("/")


@dataclass(frozen=True)
class LaunchSpec:
    """The job container. env_names only: values are looked up at launch and never stored or shown here."""

    image: str
    args: tuple[str, ...]  # appended to the entrypoint
    gpus: GpuRequest
    shm_size: str
    mounts: tuple[Mount, ...]
    env_names: tuple[str, ...]
    network: str
    name: str = ""
    entrypoint: tuple[str, ...] = ()  # empty: the image's own, `mlflow run <project> --env-manager local`
    cpus: float = 0.0  # docker's --cpus: a CPU quota the job's threads are sized to; 0, none

    def describe(self) -> list[str]:
        """What a person should see before the job starts: no environment values."""
        mounts = ", ".join(f"{m.source} -> {m.target}{' (ro)' if m.read_only else ''}" for m in self.mounts)
        network = self.network or "default"
        return [
            f"image {self.image}, gpus {self.gpus.describe()}, cpus {f'{self.cpus:g}' if self.cpus else 'all'}, "
            f"shm {self.shm_size}, network {network}",
            f"mounts: {mounts or 'none'}",
            f"environment (values hidden): {', '.join(self.env_names) or 'none'}",
            "job: " + " ".join(self.entrypoint or ("mlflow run",)) + "".join(" " + a for a in self.args),
        ]


def parse_gpus(value: str) -> GpuRequest:
    """docker's syntax: all, a count, device=ID[,ID...]; plus none for a CPU-only run."""
    text = value.strip().lower()
    if text == "all":
        return GpuRequest(-1)
    if text in ("none", "0"):
        return GpuRequest(0)
    if text.isdigit():
        return GpuRequest(int(text))
    if text.startswith("device="):
        ids = tuple(i.strip() for i in value.strip()[len("device=") :].split(",") if i.strip())
        if ids:
            return GpuRequest(0, ids)
    raise SpecError(f"--gpus {value!r}: pass all, a count (2), device=ID[,ID...] (device=0,1) or none")


def is_host_folder(value: str, is_folder_here: bool) -> bool:
    """--data, --cache: a host folder when one exists by that name or the value has a slash, else a docker volume."""
    return is_folder_here or "/" in value


def tracking_problem(uri: str) -> str | None:
    """Why the container could not report to this tracking URI (never shown: it may hold a password), or None."""
    if not uri:
        return f"no tracking server: set {TRACKING_ENV} or pass --tracking-uri (the container's own store dies with it)"
    if urlsplit(uri).scheme.lower() in ("", "file", "sqlite"):
        return f"{TRACKING_ENV} is a local store: the runs would vanish with the container; use a tracking server"
    return None


def job_environ(environ: Mapping[str, str], tracking_uri: str, verbose: bool) -> dict[str, str]:
    """Where the container's variables are taken from: the caller's environment, the tracking URI, and -v's
    LR_FINDER_LOG_LEVEL=DEBUG (the job reads it, under `mlflow run` too)."""
    return {**environ, TRACKING_ENV: tracking_uri, **({LEVEL_ENV: "DEBUG"} if verbose else {})}


def env_names(available: Iterable[str], extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The tracking URI, the credentials and log level the caller has set, and any extra names asked for: sorted,
    by name."""
    bad = [n for n in extra if not _ENV_NAME.fullmatch(n)]
    if bad:
        raise SpecError(f"--env {bad[0]!r}: pass a variable name (its value is taken from this environment)")
    present = set(available)
    missing = [n for n in extra if n not in present]
    if missing:
        raise SpecError(f"--env {missing[0]}: not set in this environment")
    return tuple(sorted({TRACKING_ENV, *(n for n in (*CREDENTIAL_ENV, *PLAIN_ENV) if n in present), *extra}))


def secret_values(env: Mapping[str, str]) -> list[str]:
    """The values scrub masks: those of every variable passed, but the plain ones."""
    return [value for name, value in env.items() if name not in PLAIN_ENV]


def launch_spec(
    image: str,
    *,
    gpus: str,
    shm_size: str,
    data: str,
    cache: str,
    names: tuple[str, ...],
    network: str,
    command: tuple[str, ...] = (),
    entrypoint: tuple[str, ...] = (),
    name: str = "",
    code: str = "",
    cpus: str = "",
) -> LaunchSpec:
    """The job container; raises SpecError on anything the job could not survive. command and entrypoint are
    job_args' JobCommand; data, cache and code are host folders as absolute paths, or (data and cache) docker
    volume names."""
    if not re.fullmatch(r"\d+[bkmg]?", shm_size.strip().lower()):
        raise SpecError(f"--shm-size {shm_size!r}: pass a size such as 2g or 512m")
    mounts = [_mount("--data", data, DATA_TARGET, read_only=True)] if data else []
    if cache:
        mounts.append(_mount("--cache", cache, CACHE_TARGET, read_only=False))
    if code:
        mounts.append(_mount("--code", code, CODE_TARGET, read_only=True))
    return LaunchSpec(
        image=image,
        args=command,
        gpus=parse_gpus(gpus),
        shm_size=shm_size.strip().lower(),
        mounts=tuple(mounts),
        env_names=names,
        network=network,
        name=name,
        entrypoint=entrypoint,
        cpus=parse_cpus(cpus),
    )


def parse_cpus(value: str) -> float:
    """docker's --cpus: a positive number of CPUs, fractions allowed; empty for no quota."""
    try:
        cpus = float(value) if value.strip() else 0.0
    except ValueError:
        cpus = -1.0
    if not (cpus >= 0 and cpus < 1e6) or (value.strip() and cpus == 0):
        raise SpecError(f"--cpus {value!r}: pass a number of CPUs above 0, such as 1, 2 or 1.5")
    return cpus


def _mount(option: str, source: str, target: str, read_only: bool) -> Mount:
    if not source.startswith("/") and not _VOLUME_NAME.fullmatch(source):
        raise SpecError(f"{option} {source!r}: pass a folder (./{source}) or a docker volume name ([A-Za-z0-9_.-])")
    return Mount(source, target, read_only)


TORCH_VARIANTS = ("pypi", "cu128", "cu126", "cpu")  # the Dockerfile's TORCH_VARIANT; README: the driver each needs


def build_args(pairs: Iterable[str], base_image: str, torch_variant: str, revision: str) -> dict[str, str]:
    """The Dockerfile's build args: --build-arg KEY=VALUE pairs win over the named options and the provenance."""
    args = {"VCS_REF": revision}
    if base_image:
        args["BASE_IMAGE"] = base_image
    if torch_variant:
        args["TORCH_VARIANT"] = torch_variant
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.fullmatch(key):
            raise SpecError(f"--build-arg {item!r}: expected KEY=VALUE, e.g. --build-arg PIP_INDEX_URL=https://...")
        args[key] = value
    return args


def name_conflict(name: str, status: str, ours: bool) -> str | None:
    """Why a container already named `name` blocks this run, or None when it is this service's exited leftover
    (an `lr-finder run` killed with SIGKILL cannot remove its container), which the run removes first."""
    if ours and status in ("created", "exited", "dead"):
        return None
    if ours:
        return f"a container named {name} is still {status} (an earlier lr-finder run): `docker stop {name}` ends it"
    return f"a container named {name} exists that lr-finder did not start: remove it (docker rm {name}) or pass --name"


def scrub(text: str, secrets: Iterable[str]) -> str:
    """The text with every secret value replaced by ***."""
    for value in secrets:
        if len(value) >= 4:  # shorter values would mask ordinary words
            text = text.replace(value, "***")
    return text
