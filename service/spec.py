"""What to launch, decided without docker: command-line choices -> a LaunchSpec, and the pure checks around it."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mlproject import markdown
from mlproject.catalog import BUILTIN_DATASETS, IDX_FILES
from mlproject.tracking_env import CREDENTIAL_ENV

DATA_TARGET = "/data"  # the image's dataset volume (FASHION_MNIST_DIR)
CACHE_TARGET = "/home/lrfinder/.cache"  # the job downloads into ~/.cache/mlproject when /data is empty
CODE_TARGET = "/code"  # the user's code, which the job puts on its import path (-P code=/code)
RESUME_COMMAND = ("python", "-m", "mlproject", "train", "--resume")  # the image's PYTHONPATH holds mlproject
TRACKING_ENV = "MLFLOW_TRACKING_URI"
LABEL = "org.lr-finder.job"  # marks containers this service launched
ENGINE_HINT = "install Docker (apt-get install docker.io) and start it (systemctl start docker), or set DOCKER_HOST"
_RUN_ID = re.compile(r"in run with ID '([0-9a-f]{32})'")  # `mlflow run` logs this line before it starts the job
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]+")  # docker's rule for a named volume
_RUN_ID_SHAPE = re.compile(r"[A-Za-z0-9_-]{1,64}")


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
    resume: str = ""  # the run this container continues

    def describe(self) -> list[str]:
        """What a person should see before the job starts: no environment values."""
        mounts = ", ".join(f"{m.source} -> {m.target}{' (ro)' if m.read_only else ''}" for m in self.mounts)
        network = self.network or "default"
        return [
            f"image {self.image}, gpus {self.gpus.describe()}, shm {self.shm_size}, network {network}",
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


def parse_params(params: Iterable[str]) -> tuple[str, ...]:
    """-P key=value, checked for shape only: the job checks the values and names what is wrong."""
    args: list[str] = []
    for item in params:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"-P {item!r}: expected key=value, e.g. -P auto_lr=true")
        args += ["-P", item]
    return tuple(args)


def param_values(params: Iterable[str]) -> dict[str, str]:
    """-P key=value pairs as a mapping (the last of a repeated key wins, as in mlflow run)."""
    return dict(item.partition("=")[::2] for item in params)


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


def env_names(available: Iterable[str], extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The tracking URI, the credentials the caller has set, and any extra names asked for: sorted, by name."""
    bad = [n for n in extra if not _ENV_NAME.fullmatch(n)]
    if bad:
        raise SpecError(f"--env {bad[0]!r}: pass a variable name (its value is taken from this environment)")
    present = set(available)
    missing = [n for n in extra if n not in present]
    if missing:
        raise SpecError(f"--env {missing[0]}: not set in this environment")
    return tuple(sorted({TRACKING_ENV, *(n for n in CREDENTIAL_ENV if n in present), *extra}))


def launch_spec(
    image: str,
    gpus: str,
    shm_size: str,
    data: str,
    cache: str,
    names: tuple[str, ...],
    network: str,
    params: Iterable[str] = (),
    entry_point: str = "main",
    experiment: str = "",
    name: str = "",
    code: str = "",
    run_name: str = "",
    resume: str = "",
) -> LaunchSpec:
    """The container `lr-finder run` starts; raises SpecError on anything the job could not survive.

    data, cache and code are host folders as absolute paths, or (data and cache) docker volume names."""
    if not re.fullmatch(r"\d+[bkmg]?", shm_size.strip().lower()):
        raise SpecError(f"--shm-size {shm_size!r}: pass a size such as 2g or 512m")
    mounts = [_mount("--data", data, DATA_TARGET, read_only=True)] if data else []
    if cache:
        mounts.append(_mount("--cache", cache, CACHE_TARGET, read_only=False))
    if code:
        mounts.append(_mount("--code", code, CODE_TARGET, read_only=True))
    params = tuple(params)
    if resume:
        entrypoint, args = resume_command(resume, params, entry_point, experiment, run_name)
    else:
        entrypoint, args = (), mlflow_run_args(params, entry_point, experiment, run_name, bool(code))
    return LaunchSpec(
        image=image,
        args=args,
        gpus=parse_gpus(gpus),
        shm_size=shm_size.strip().lower(),
        mounts=tuple(mounts),
        env_names=names,
        network=network,
        name=name,
        entrypoint=entrypoint,
        resume=resume,
    )


def _mount(option: str, source: str, target: str, read_only: bool) -> Mount:
    if not source.startswith("/") and not _VOLUME_NAME.fullmatch(source):
        raise SpecError(f"{option} {source!r}: pass a folder (./{source}) or a docker volume name ([A-Za-z0-9_.-])")
    return Mount(source, target, read_only)


def mlflow_run_args(
    params: tuple[str, ...], entry_point: str, experiment: str, run_name: str, code: bool
) -> tuple[str, ...]:
    """`mlflow run`'s arguments after the project: the entry point, the run's names, and the job's parameters.

    The job's own data folder is /data for a dataset that is not built in (the built-ins are searched for)."""
    args: tuple[str, ...] = ("-e", entry_point)
    if experiment:
        args += ("--experiment-name", experiment)
    if run_name:
        args += ("--run-name", run_name)
    args += parse_params(params)
    given = param_values(params)
    if code:
        if "code" in given:
            raise SpecError(f"--code mounts the folder at {CODE_TARGET} and passes -P code={CODE_TARGET}: drop -P code")
        args += ("-P", f"code={CODE_TARGET}")
    if given.get("dataset", BUILTIN_DATASETS[0]) not in BUILTIN_DATASETS and not given.get("data_dir"):
        args += ("-P", f"data_dir={DATA_TARGET}")
    return args


def resume_command(
    run_id: str, params: tuple[str, ...], entry_point: str, experiment: str, run_name: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The entrypoint and arguments that continue a run in the container: the job, not `mlflow run`, which would
    start a new run (or, given the run's id, log its parameters again)."""
    if not _RUN_ID_SHAPE.fullmatch(run_id):
        raise SpecError(
            f"--resume {run_id!r}: pass the id of the stopped run, as its KILLED line or the MLflow UI shows it"
        )
    named = {"-P": bool(params), "--entry-point": entry_point != "main", "--experiment-name": bool(experiment)}
    ignored = [flag for flag, given in {**named, "--run-name": bool(run_name)}.items() if given]
    if ignored:
        raise SpecError(f"--resume continues the run with its own configuration and names: drop {', '.join(ignored)}")
    return RESUME_COMMAND, (run_id,)


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


def find_run_id(log: str) -> str | None:
    """The MLflow run `mlflow run` created, from its log; None when it never got that far."""
    found = _RUN_ID.search(log)
    return found.group(1) if found else None


@dataclass(frozen=True)
class Probe:
    """One `lr-finder doctor` check that runs inside the job image, with the same mounts, network and environment."""

    name: str
    code: str  # Python run by the image's interpreter; exit 0 = ok; prints one line either way
    gpus: bool
    hint: str


_GPU_CODE = """import sys, torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(", ".join(torch.cuda.get_device_name(i) for i in range(n)) or f"torch {torch.__version__} sees no GPU")
sys.exit(0 if n else 1)"""
_TRACKING_CODE = """import sys
from mlflow import MlflowClient
try:
    MlflowClient().search_experiments(max_results=1)
except Exception as exc:  # any failure is the answer; print its first line only
    print(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"); sys.exit(1)
print("answers and accepts the credentials")"""
_DATASET_CODE = """import os, sys
names = {names}
for d in {dirs}:
    if all(os.path.isfile(os.path.join(d, n)) or os.path.isfile(os.path.join(d, n + ".gz")) for n in names):
        print("four IDX files in " + d); sys.exit(0)
print("no Fashion-MNIST IDX files in " + " or ".join({dirs})); sys.exit(1)"""


def doctor_probes(spec: LaunchSpec) -> list[Probe]:
    """GPU (unless --gpus none), tracking server and dataset, each checked where the job will run."""
    dirs = [DATA_TARGET] + [
        f"{CACHE_TARGET}/mlproject/fashion-mnist/FashionMNIST/raw" for m in spec.mounts if m.target == CACHE_TARGET
    ]
    probes = [
        Probe(
            "tracking server",
            _TRACKING_CODE,
            gpus=False,
            hint=f"check {TRACKING_ENV} from inside a container (--network host for a server on 127.0.0.1) and "
            "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN",
        ),
        Probe(
            "dataset",
            _DATASET_CODE.format(names=repr(tuple(IDX_FILES.values())), dirs=repr(dirs)),
            gpus=False,
            hint="pass --data DIR with the four *-ubyte[.gz] files (Debian's dataset-fashion-mnist: "
            "/usr/share/datasets/fashion-mnist), or --cache VOLUME and let a first run download it",
        ),
    ]
    if spec.gpus.wanted:
        gpu = Probe(
            "GPU in a container",
            _GPU_CODE,
            gpus=True,
            hint="install the NVIDIA driver and the NVIDIA container toolkit (nvidia-ctk runtime configure "
            "--runtime=docker, restart dockerd); the image's torch build needs a recent driver (see README)",
        )
        probes.insert(0, gpu)
    return probes


SUMMARY_FIGURES = ("lr_suggested", "lr_used", "lr_source", "test_acc", "test_loss", "final_val_acc", "final_val_loss")


def summary_markdown(run_id: str, status: str, link: str, figures: Mapping[str, str]) -> str:
    """A CI job summary: the run, its link, the suggested and used LR and the final metrics ('-' when absent)."""
    title = f"[`{run_id}`]({link})" if link else f"`{run_id}`"
    row = [markdown.cell(figures.get(k, "") or "-") for k in SUMMARY_FIGURES]
    return f"### lr-finder run {title}: {markdown.cell(status)}\n\n" + markdown.table(SUMMARY_FIGURES, [row])


class TransferProgress:
    """A pull's events (`lr-finder run` pulling the image, a build's FROM) -> a line at each finished layer and
    every few seconds between: layers done, megabytes downloaded. Docker sends one event per 512 kB per layer."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self._layers: set[str] = set()
        self._done: set[str] = set()
        self._bytes: dict[str, tuple[int, int]] = {}  # layer -> (downloaded, size)
        self._shown = float("-inf")

    def line(self, event: Mapping[str, Any], now: float) -> str | None:
        """The line this event is worth, if any; events of no layer (Digest:, Status:) are shown as they are."""
        status, layer = str(event.get("status") or ""), str(event.get("id") or "")
        if not layer or status.startswith("Pulling from"):
            return status or None
        self._layers.add(layer)
        detail = event.get("progressDetail") or {}
        if status == "Downloading" and detail.get("total"):
            self._bytes[layer] = (int(detail.get("current") or 0), int(detail["total"]))
        elif status == "Download complete" and layer in self._bytes:
            self._bytes[layer] = (self._bytes[layer][1], self._bytes[layer][1])
        if status in ("Pull complete", "Already exists"):
            self._done.add(layer)
        elif now - self._shown < self.every_s:
            return None
        self._shown = now
        got, size = (sum(pair[i] for pair in self._bytes.values()) / 1e6 for i in (0, 1))
        return f"layers {len(self._done)}/{len(self._layers)} done, {got:.1f} of {size:.1f} MB downloaded"


OUTPUT_ARTIFACTS = ("lr_find/loss_vs_lr.png", "lr_find/summary.json", "study.json")  # --outputs, when the run has them


def run_record(run_id: str, experiment_id: str, status: str, link: str) -> dict[str, str]:
    """--outputs' run.json: what a CI step needs to find the run."""
    return {"run_id": run_id, "experiment_id": experiment_id, "status": status, "link": link}


def scrub(text: str, secrets: Iterable[str]) -> str:
    """The text with every secret value replaced by ***."""
    for value in secrets:
        if len(value) >= 4:  # shorter values would mask ordinary words
            text = text.replace(value, "***")
    return text
