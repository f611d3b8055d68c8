"""What several test modules share: where things are, small datasets, a small job, and real processes to run
(`mlflow run`, the job's command line, `lr-finder server`). No test module imports another."""

from __future__ import annotations

import base64
import gzip
import http.server
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
import venv
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


def host_install(folder: Path) -> Path:
    """A fresh virtual environment holding `pip install -c constraints.txt .`, the host side as the GPU pipelines
    install it, built from a copy of this checkout (pip's build writes beside the sources); returns its bin/."""
    venv.create(folder / "venv", with_pip=True)
    source = folder / "source"
    skipped = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "__pycache__", "*.db", "mlruns")
    shutil.copytree(REPO, source, ignore=skipped)
    pip = [str(folder / "venv" / "bin" / "pip"), "install", "-q", "-c", str(LOCK), str(source)]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "venv" / "bin"


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


def write_tiny_image_folder(root: Path) -> Path:
    """An image folder for checks, not training: train/<class>/ with two 8x8 grey PNGs in each of two classes."""
    from PIL import Image

    for label, shade in (("cats", 40), ("dogs", 200)):
        (root / "train" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), shade + i).save(root / "train" / label / f"{i}.png")
    return root


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


def mlflow_run(
    tmp: Path, experiment: str, *params: str, entry: str = "main", env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`mlflow run` as a user types it, with the venv's bin first on PATH so MLproject's `python` is ours."""
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:  # keep artifacts out of the repository
        client.create_experiment(experiment, artifact_location=str(tmp / "artifacts" / experiment))
    extra = dict(env or {})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # nothing left by another test
    env.update(MLFLOW_TRACKING_URI=uri, PATH=f"{BIN}:{os.environ['PATH']}", **extra)
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


@contextmanager
def lr_finder_server(
    folder: Path, *args: str, env: Mapping[str, str] | None = None, wait_s: float = 240
) -> Iterator[RunningServer]:
    """`lr-finder server ARGS --port FREE` exactly as given (the backend store from the arguments, the environment or
    a file), until it says it is ready; stopped with SIGTERM at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), folder / "server.log"
    cmd = [str(BIN / "lr-finder"), "server", *args, "--port", str(port), "--wait", str(wait_s)]
    began = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=folder, env=dict(env or os.environ))
    try:
        ready = wait_for_line(process, log, "lr-finder server: ready at", wait_s + 10)
        url = ready.split("ready at ", 1)[1].split()[0]
        yield RunningServer(url, log, process, time.monotonic() - began)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def wait_for_line(process: subprocess.Popen[bytes], log: Path, text: str, timeout_s: float) -> str:
    """The first line of the process's log holding `text`, once it is there; fails if the process ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [line for line in log.read_text(errors="replace").splitlines() if text in line]
        if found:
            return found[0]
        assert process.poll() is None, f"exited {process.returncode} before {text!r}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def postgres_bin() -> Path | None:
    """Debian keeps initdb and pg_ctl out of PATH, under /usr/lib/postgresql/VERSION/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@contextmanager
def postgres_database(password: str = "") -> Iterator[str]:
    """A throwaway PostgreSQL on a free loopback port, run as `postgres` when root; yields the database URI. With a
    password, TCP clients must give it (scram-sha-256), so the URI works only if the password reaches the server."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL not installed: apt-get install postgresql (bash .ci/setup --tests does)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="lr-finder-pg-"))  # not tmp_path: the server's user must own it
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data = free_port(), folder / "data"

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_user, str(bindir / tool), *args], check=True, capture_output=True, timeout=120)

    auth = ["--auth=trust"]
    if password:
        secret = folder / "pwfile"
        secret.write_text(password + "\n")
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={secret}"]
    pg("initdb", "-D", str(data), "-U", "mlflow", *auth, "-E", "UTF8", "--no-sync")
    if password:
        secret.unlink()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"
    pg("pg_ctl", "-D", str(data), "-l", str(folder / "postgres.log"), "-w", "-t", "60", "-o", options, "start")
    try:
        pg("createdb", "-h", str(folder), "-p", str(port), "-U", "mlflow", "mlflow")  # the socket: trusted
        userinfo = f"mlflow:{password}" if password else "mlflow"
        yield f"postgresql://{userinfo}@127.0.0.1:{port}/mlflow"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def http_answering(status: int, body: bytes, content_type: str = "text/html", port: int = 0) -> Iterator[str]:
    """A tiny HTTP server on loopback that answers every GET and POST with the same status and body (a server that
    is not MLflow, or one that holds a port); yields its URL."""

    class Same(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, format: str, *args: object) -> None:  # no line per request in the test's output
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Same)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def lr_finder(*args: str, env: Mapping[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`lr-finder ARGS` as a process, output captured as text."""
    cmd = [str(BIN / "lr-finder"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(env or os.environ), timeout=timeout)
