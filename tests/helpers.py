"""What several test modules share: where things are, small datasets, a small job, and real processes to run
(`mlflow run`, the job's command line, `lr-finder server`). No test module imports another."""

from __future__ import annotations

import base64
import gzip
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mlproject.catalog import FASHION_MNIST_DIR
from service import server

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FASHION_DIR = Path(FASHION_MNIST_DIR)
AUTH_ENV = {server.AUTH_SECRET_ENV: "test-secret", server.AUTH_PASSWORD_ENV: "Admin-pass-2026!"}

requires_fashion_mnist = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist",
)

# --- the tested set ---------------------------------------------------------------------------------------------

LOCK = REPO / "constraints.txt"


def canonical(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503): PyYAML, pyyaml and py_yaml are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, str]:
    """constraints.txt: each package's canonical name -> its one tested version."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, version = requirement.split("==")
            pins[canonical(name)] = version.strip()
    return pins


def requirements(extra: str = "") -> list[str]:
    """pyproject.toml's requirements: the base install's, or an extra's."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["optional-dependencies"][extra] if extra else project["dependencies"])


# --- a small job -----------------------------------------------------------------------------------------------

# A job that trains in seconds on the real dataset: the one shape every test starts from, changed by keyword.
SMALL_JOB = {"train_subset": "2000", "val_size": "1000", "epochs": "1", "lr_steps": "20", "auto_lr": "true"}


def small_job(**changes: object) -> dict[str, str]:
    """SMALL_JOB with some parameters changed, by their MLproject names."""
    spelled = {name: str(value).lower() if isinstance(value, bool) else str(value) for name, value in changes.items()}
    return {**SMALL_JOB, **spelled}


def as_options(params: Mapping[str, str]) -> list[str]:
    """{'lr_steps': '20'} -> ['--lr-steps', '20'], the job's command line."""
    return [arg for name, value in params.items() for arg in ("--" + name.replace("_", "-"), value)]


def as_mlflow_params(params: Mapping[str, str]) -> list[str]:
    """{'lr_steps': '20'} -> ['lr_steps=20'], for mlflow_run()."""
    return [f"{name}={value}" for name, value in params.items()]


# --- IDX files -------------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    raw = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_dataset(folder: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """Four gzipped IDX files whose label is readable from the image (class k brightens row band k)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k + 4 : 2 * k + 6, :] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    return folder


# --- the job as a process --------------------------------------------------------------------------------------


def job_env(uri: str, **extra: str) -> dict[str, str]:
    """This environment without any MLflow variable another test left, pointed at `uri`, importing this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO), **extra}


def start_job(cwd: Path, command: str, *args: str, env: dict[str, str], experiment: str = "jobs") -> subprocess.Popen:
    """`python -m mlproject COMMAND --experiment-name EXPERIMENT ARGS`, output captured."""
    cmd = [sys.executable, "-m", "mlproject", command, "--experiment-name", experiment, *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def mlflow_run(tmp: Path, experiment: str, *params: str, entry: str = "main") -> subprocess.CompletedProcess:
    """`mlflow run` as a user types it, with the venv's bin first on PATH so MLproject's `python` is ours."""
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:  # keep artifacts out of the repository
        client.create_experiment(experiment, artifact_location=str(tmp / "artifacts" / experiment))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # nothing left by another test
    env.update(MLFLOW_TRACKING_URI=uri, PATH=f"{BIN}:{os.environ['PATH']}")
    args = [str(BIN / "mlflow"), "run", str(REPO), "-e", entry, "--env-manager", "local"]
    args += ["--experiment-name", experiment]
    for p in params:
        args += ["-P", p]
    return subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)


def runs_of(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def wait_for_metric(client: MlflowClient, experiment: str, key: str, timeout: float = 300) -> str:
    """The id of the experiment's first run once it has logged `key` (e.g. epoch_seconds: an epoch has ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = runs_of(client.tracking_uri, experiment)
        if runs and client.get_metric_history(runs[0].info.run_id, key):
            return runs[0].info.run_id
        time.sleep(0.2)
    raise AssertionError(f"no run of {experiment} logged {key} within {timeout:.0f} s")


# --- servers ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port free now, below Linux's ephemeral range (32768 up): a server binds it seconds later, and
    meanwhile no outgoing connection can be handed it as its source port."""
    for port in random.Random().sample(range(20000, 32768), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free loopback port in 20000-32767")


@dataclass(frozen=True)
class RunningServer:
    url: str
    log: Path
    process: subprocess.Popen[bytes]
    startup_s: float

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_server(
    folder: Path, backend_uri: str, *options: str, env: dict[str, str] | None = None, wait_s: float = 240
) -> Iterator[RunningServer]:
    """`lr-finder server` as a team member starts it, on a free loopback port; stopped with SIGTERM at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), folder / "server.log"
    args = [str(BIN / "lr-finder"), "server", "--backend-store-uri", backend_uri, "--port", str(port)]
    args += ["--artifacts-destination", str(folder / "artifacts"), "--wait", str(wait_s), *options]
    began = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, cwd=folder, env={**os.environ, **(env or {})}
        )
    try:
        while "lr-finder server: ready at" not in log.read_text(errors="replace"):
            assert process.poll() is None, f"lr-finder server exited {process.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() - began < wait_s + 10, "lr-finder server never said it was ready"
            time.sleep(0.5)
        yield RunningServer(f"http://127.0.0.1:{port}", log, process, time.monotonic() - began)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


@dataclass(frozen=True)
class JobResult:
    code: int
    output: str
    seconds: float


def run_jobs(
    tracking_uri: str, experiment: str, jobs: Sequence[Sequence[str]], folder: Path, timeout_s: float
) -> list[JobResult]:
    """Start every `python -m mlproject ARGS` at once against the tracking URI; wait for all (bounded)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_EXPERIMENT_NAME": experiment}
    env["OMP_NUM_THREADS"] = "1"  # eight jobs share two cores: one thread each avoids oversubscription
    env.pop("MLFLOW_RUN_ID", None)
    began, started = time.monotonic(), []
    for i, args in enumerate(jobs):
        with (folder / f"job{i}.log").open("wb") as out:
            cmd = [sys.executable, "-m", "mlproject", *args]
            started.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=folder, env=env))
    results = []
    for i, process in enumerate(started):
        remaining = max(1.0, timeout_s - (time.monotonic() - began))
        try:
            code = process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        output = (folder / f"job{i}.log").read_text(errors="replace")
        results.append(JobResult(code, output, time.monotonic() - began))
    return results


def http_status(url: str, user: str = "", password: str = "") -> int:
    request = urllib.request.Request(url)
    if user:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
