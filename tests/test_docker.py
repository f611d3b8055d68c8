"""The job image on a real Docker engine: built by `lr-finder build`, run by `lr-finder run` against a real
basic-auth MLflow server, stopped by a real SIGTERM, checked by `lr-finder doctor`. CPU only: no GPU here.

The base image is Debian bookworm made locally (no registry to pull from); the Python packages come from a
mirror of exactly the image's pins, served on 127.0.0.1 for the build. Both are cached between test runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from packaging.requirements import Requirement

from service import server, spec
from tests.helpers import (
    AUTH_ENV,
    BIN,
    FASHION_DIR,
    LOCK,
    REPO,
    as_mlflow_params,
    canonical,
    free_port,
    lock_pins,
    requirements,
    requires_fashion_mnist,
    running_server,
    small_job,
    write_tiny_image_folder,
)

docker = pytest.importorskip("docker", reason="the docker SDK is not installed (pip install -e '.[test]')")
DockerMount = docker.types.Mount

pytestmark = [pytest.mark.docker, requires_fashion_mnist]
BASE_IMAGE = "lr-finder-test-base:bookworm"
IMAGE = "lr-finder:test"
EXAMPLE = REPO / "examples" / "docker"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lr-finder-tests"
MIRROR_PORT = 38417  # fixed: the port is part of a build arg, so a new one would rebuild torch's layer
PASSWORD = "pw-LRF-visible-nowhere-4711"  # recognisable: no output may contain it
JOB = [arg for param in as_mlflow_params(small_job(lr_steps=50)) for arg in ("-P", param)]


def _engine() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=900)
        client.ping()
    except (docker.errors.DockerException, OSError) as exc:
        pytest.skip(f"no Docker engine answers ({exc}); .ci/run starts dockerd, or start it yourself")
    return client


@pytest.fixture(scope="session")
def engine() -> docker.DockerClient:
    return _engine()


@pytest.fixture(scope="session")
def base_image(engine: docker.DockerClient) -> str:
    """Debian bookworm minbase, made once with debootstrap and docker import, then reused."""
    try:
        engine.images.get(BASE_IMAGE)
        return BASE_IMAGE
    except docker.errors.ImageNotFound:
        pass
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.skip(f"no {BASE_IMAGE} and no way to make it: needs root and debootstrap (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="lrf-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
            check=True,
            capture_output=True,
            timeout=900,
        )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, check=True, capture_output=True)
        assert tar.wait() == 0
    return BASE_IMAGE


def _wanted() -> list[str]:
    """What the image and the example recipe install: the [job] extra and the example's extra package."""
    example = (EXAMPLE / "requirements.txt").read_text().splitlines()
    return [*requirements("job"), *(line for line in example if line.strip() and not line.startswith("#"))]


def _mirror_folder() -> Path:
    """A PEP 503 index of the wheels the image installs, downloaded once by this machine's pip."""
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the mirror holds this interpreter's wheels; the image's Python is 3.11")
    wanted = _wanted()
    key = "\n".join([*wanted, LOCK.read_text()])
    folder = CACHE / ("mirror-" + hashlib.sha256(key.encode()).hexdigest()[:12])
    if (folder / "simple" / "torch" / "index.html").is_file():
        return folder
    wheels = folder / "files"
    download = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--dest", str(wheels)]
    download += ["-c", str(LOCK), *wanted]
    done = subprocess.run(download, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"pip download for the mirror failed:\n{done.stderr[-3000:]}"
    for wheel in sorted(wheels.glob("*.whl")):
        project = canonical(wheel.name.split("-")[0])
        page = folder / "simple" / project / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        with page.open("a") as out:
            out.write(f'<a href="../../files/{wheel.name}">{wheel.name}</a>\n')
    return folder


@pytest.fixture(scope="session")
def mirror_url() -> Iterator[str]:
    """The mirror served over HTTP on loopback for as long as the session's builds need it."""
    folder = _mirror_folder()
    port = MIRROR_PORT if _port_free(MIRROR_PORT) else free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)]
    with serving(cmd, port, "the package mirror"):
        yield f"http://127.0.0.1:{port}/simple"


@contextlib.contextmanager
def serving(cmd: list[str], port: int, what: str) -> Iterator[None]:
    """A server process, from the moment it listens on the loopback port until the block ends."""
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while _port_free(port):  # nothing listens yet
            assert process.poll() is None and time.monotonic() < deadline, f"{what} never listened"
            time.sleep(0.1)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def lr_finder(
    *args: str, env: dict[str, str] | None = None, timeout: float = 1800, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """The console script as a person types it."""
    return subprocess.run(
        [str(BIN / "lr-finder"), *args], capture_output=True, text=True, timeout=timeout, env=clean_env(env), cwd=cwd
    )


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without the tracking variables another test left, plus env."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")} | (env or {})


def build(
    base_image: str, mirror_url: str, context: Path = REPO, tag: str = IMAGE, *extra: str
) -> subprocess.CompletedProcess:
    args = ["build", "--context", str(context), "--tag", tag, "--network", "host", *extra]
    base = ["--base-image", base_image] if base_image else []
    return lr_finder(*args, *base, "--build-arg", f"PIP_INDEX_URL={mirror_url}")


def in_image(engine: docker.DockerClient, *command: str, image: str = IMAGE, **options: object) -> str:
    """What a command prints in a throwaway container of the image (its entrypoint replaced); fails unless it
    exits 0."""
    container = engine.containers.run(image, entrypoint=list(command), detach=True, **options)
    try:
        code = container.wait(timeout=300)["StatusCode"]
        output = container.logs().decode()
    finally:
        container.remove(v=True)
    assert code == 0, output[-3000:]
    return output


@dataclass(frozen=True)
class Built:
    result: subprocess.CompletedProcess
    revision: str  # the commit checked out when it was built


def head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="session")
def image(engine: docker.DockerClient, base_image: str, mirror_url: str) -> Built:
    began, revision = time.monotonic(), head()
    previous = _image_id(engine)
    result = build(base_image, mirror_url)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"\nimage {IMAGE}: built in {time.monotonic() - began:.0f} s")
    if previous and previous != _image_id(engine):  # the last session's image, now untagged: its layers stay cached
        with contextlib.suppress(docker.errors.APIError):  # a container still uses it
            engine.images.remove(previous)
    return Built(result, revision)


def _image_id(engine: docker.DockerClient) -> str:
    try:
        return engine.images.get(IMAGE).id
    except docker.errors.ImageNotFound:
        return ""


@pytest.fixture(scope="session")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A basic-auth tracking server on this machine's loopback (the containers use the host network)."""
    folder = tmp_path_factory.mktemp("tracking")
    env = {**AUTH_ENV, server.AUTH_PASSWORD_ENV: PASSWORD}
    uri = f"sqlite:///{folder}/mlflow.db"
    with running_server(folder, uri, "--app-name", "basic-auth", "--workers", "1", env=env) as srv:
        yield srv.url


def credentials(uri: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD, "MLFLOW_TRACKING_URI": uri}


@contextlib.contextmanager
def as_admin(uri: str) -> Iterator[MlflowClient]:
    """A client of the server signed in as the admin: MlflowClient takes credentials from the environment only."""
    saved = dict(os.environ)
    os.environ.update({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD})
    try:
        yield MlflowClient(uri)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def runs(uri: str, experiment: str) -> list:
    """The experiment's runs."""
    with as_admin(uri) as client:
        found = client.get_experiment_by_name(experiment)
        return client.search_runs([found.experiment_id]) if found else []


def steps(uri: str, run_id: str, key: str) -> list[int]:
    """The steps at which the run logged `key`: one per epoch for the epoch metrics."""
    with as_admin(uri) as client:
        return [m.step for m in client.get_metric_history(run_id, key)]


def start(log: Path, *args: str, env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
    """`lr-finder ARGS` in the background, its output in log."""
    with log.open("w") as out:
        return subprocess.Popen(
            [str(BIN / "lr-finder"), *args], stdout=out, stderr=subprocess.STDOUT, env=clean_env(env), cwd=cwd
        )


def wait_for(log: Path, process: subprocess.Popen, line: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while line not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {line!r} within {timeout:.0f} s"
        time.sleep(0.5)


def run_args(experiment: str, *args: str) -> list[str]:
    """`lr-finder run` on the CPU, with the real dataset, reaching the loopback server through the host network."""
    return [
        "run", "--image", IMAGE, "--gpus", "none", "--network", "host", "--data", str(FASHION_DIR),
        "--experiment-name", experiment, *args,
    ]  # fmt: skip


# --- the image -------------------------------------------------------------------------------------------------


def test_image_runs_as_a_non_root_user_with_the_job_as_entrypoint(engine, image):
    attrs = engine.images.get(IMAGE).attrs["Config"]
    assert attrs["User"] == "1000:1000"
    assert attrs["Entrypoint"] == ["mlflow", "run", "/opt/lr-finder", "--env-manager", "local"]
    assert attrs["StopSignal"] == "SIGINT"
    assert in_image(engine, "id", "-u").strip() == "1000"
    labels = attrs["Labels"]
    assert labels["org.opencontainers.image.revision"] == image.revision
    assert labels["org.opencontainers.image.title"] == "lr-finder"
    assert "lr-finder: built lr-finder:test" in image.result.stdout
    assert re.search(r"^lr-finder: sending the build context \(\d+ files, \d+ kB\)$", image.result.stdout, re.M)


def test_the_image_holds_the_job_extra_at_the_locks_versions(engine, image):
    listed = json.loads(in_image(engine, "pip", "list", "--format=json"))
    installed = {canonical(package["name"]): package["version"] for package in listed}
    pins = lock_pins()
    for text in requirements("job"):
        name = canonical(Requirement(text).name)
        assert installed[name].split("+")[0] == pins[name], name  # +cu126: another build of the same release


def test_the_job_runs_from_any_folder_with_both_lightning_namespaces(engine, image):
    # Kubernetes and Slurm run `python -m mlproject` under torchrun, in a working directory of their own.
    usage = in_image(engine, "python", "-m", "mlproject", "train", "--help", working_dir="/tmp")
    assert "--auto-lr" in usage
    imports = "import lightning.pytorch, pytorch_lightning, psutil, pynvml; print('ok')"
    assert in_image(engine, "python", "-c", imports, working_dir="/").strip() == "ok"


def test_a_new_cache_volume_is_the_job_users_to_write(engine, image):
    volume = engine.volumes.create(f"lrf-test-cache-{uuid.uuid4().hex[:8]}")
    try:
        mount = DockerMount(spec.CACHE_TARGET, volume.name, type="volume")
        probe = f"touch {spec.CACHE_TARGET}/written && stat -c %u {spec.CACHE_TARGET}"
        assert in_image(engine, "sh", "-c", probe, mounts=[mount]).strip() == "1000"
    finally:
        volume.remove(force=True)


def test_the_example_recipe_adds_a_package_and_a_user_module_and_the_job_trains_it(engine, image, mirror_url, tracking):
    tag = "lr-finder:test-example"
    result = build("", mirror_url, EXAMPLE, tag, "--build-arg", f"BASE={IMAGE}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    try:
        check = (
            "import einops, mlproject, torch, lightning.pytorch as L; from yourpkg import YourModule; "
            "assert issubclass(YourModule, L.LightningModule); "
            "print(tuple(YourModule()(torch.zeros(2, 1, 28, 28)).shape))"
        )
        assert in_image(engine, "python", "-c", check, image=tag, working_dir="/tmp").strip() == "(2, 10)"
        listed = json.loads(in_image(engine, "pip", "list", "--format=json", image=tag))
        assert {p["name"]: p["version"] for p in listed}["torch"].split("+")[0] == lock_pins()["torch"]
        args = [a if a != IMAGE else tag for a in run_args("recipe", *JOB, "-P", "model=yourpkg.YourModule")]
        done = lr_finder(*args, env=credentials(tracking))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (run,) = runs(tracking, "recipe")
        params = run.data.params
        assert run.info.status == "FINISHED" and params["lr_source"] in ("finder", "verified", "fallback")
        assert {"final_val_acc", "final_val_loss", "test_acc"} <= set(params)
        assert run.data.tags["lightning_package"] == "lightning.pytorch"
    finally:
        engine.images.remove(tag, force=True)


def test_a_code_change_rebuilds_without_reinstalling_torch(engine, base_image, mirror_url, image, tmp_path):
    context = tmp_path / "context"
    shutil.copytree(REPO, context, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "*.db", "mlruns", "tests"))
    with (context / "mlproject" / "__init__.py").open("a") as out:
        out.write("# a code change\n")
    began = time.monotonic()
    result = build(base_image, mirror_url, context, tag="lr-finder:test-change")
    assert result.returncode == 0, result.stderr[-3000:]
    engine.images.remove("lr-finder:test-change")
    log = result.stdout
    torch_step = log[log.index('pip install "$@" "torch==') :]
    assert torch_step.split("Step", 1)[0].count("Using cache") == 1, "torch's layer came from the cache"
    assert time.monotonic() - began < 120


# --- lr-finder run ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """The one-epoch job, run once for the tests that read it."""

    result: subprocess.CompletedProcess
    run: object
    summary: Path
    outputs: Path
    revision: str


@pytest.fixture(scope="session")
def finished(image, tracking, tmp_path_factory) -> Finished:
    folder = tmp_path_factory.mktemp("finished")
    summary, outputs = folder / "summary.md", folder / "outputs"
    args = [*JOB, "--summary", str(summary), "--ui-url", "http://mlflow.example", "--outputs", str(outputs)]
    began = time.monotonic()
    args += ["--run-name", "one epoch", "--cpus", "1"]  # a quota the job's threads must be sized to
    result = lr_finder(*run_args("docker", *args), env=credentials(tracking))
    print(f"\none-epoch job in the container: {time.monotonic() - began:.0f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = runs(tracking, "docker")
    return Finished(result, run, summary, outputs, image.revision)


def test_one_epoch_job_in_the_container_fulfils_the_run_contract(finished):
    run = finished.run
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["auto_lr"] == "true" and params["train_subset"] == "2000"
    assert params["lr_source"] in ("finder", "verified", "fallback")
    assert 0 < float(params["lr_used"]) < 1
    assert 0.3 < metrics["test_acc"] <= 1 and metrics["test_loss"] > 0
    for key in ("torch_version", "lightning_version", "mlflow_version", "device", "precision"):
        assert tags[key], key
    assert tags["mlflow.project.entryPoint"] == "main"
    assert tags["mlflow.user"] == "lrfinder", "the job ran as the image's non-root user"
    assert tags["mlflow.docker.image.uri"] == IMAGE
    assert tags["mlflow.source.git.commit"] == finished.revision, "the image's commit, recorded when it was built"
    assert run.info.run_name == "one epoch"


def test_the_job_computes_with_one_thread_in_a_container_given_one_cpu(finished):
    tags, metrics = finished.run.data.tags, finished.run.data.metrics
    assert tags["threads"] == "1", "torch's own count, read back as the job started"
    shape = r"\d+ CPUs? in its affinity mask, a quota of 1 \(/sys/fs/cgroup/\S+\), 1 process of the job"
    assert re.fullmatch(shape, tags["threads_from"]), tags["threads_from"]
    assert metrics["threads"] == 1
    assert "cpus 1, " in finished.result.stderr, "the launch plan says what the container is given"


def test_run_streams_the_job_log_and_writes_the_summary(finished):
    result, run = finished.result, finished.run
    run_id = run.info.run_id
    assert f"in run with ID '{run_id}'" in result.stdout
    assert f"run {run_id}: lr_used=" in result.stdout
    link = f"http://mlflow.example/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    assert f"lr-finder: run {run_id} FINISHED {link}" in result.stderr
    text = finished.summary.read_text()
    assert f"[`{run_id}`]({link}): FINISHED" in text
    assert f"{run.data.metrics['test_acc']:.4g}" in text and run.data.params["lr_used"] in text


def test_outputs_hold_the_run_record_and_the_range_tests_plot_and_summary(finished):
    run, outputs = finished.run, finished.outputs
    link = f"http://mlflow.example/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    record = json.loads((outputs / "run.json").read_text())
    assert record == {
        "run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "status": "FINISHED", "link": link,
    }  # fmt: skip
    assert (outputs / "lr_find" / "loss_vs_lr.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((outputs / "lr_find" / "summary.json").read_text())
    assert not (outputs / "study.json").exists(), "a train run has no study"
    assert f"lr-finder: wrote {outputs}/run.json, {outputs}/lr_find/loss_vs_lr.png" in finished.result.stderr


def test_credentials_and_tracking_uri_reach_the_container_but_never_the_output(finished, tracking):
    result, run = finished.result, finished.run
    assert run.info.status == "FINISHED"  # the server refuses anonymous clients: the credentials got through
    output = result.stdout + result.stderr
    assert PASSWORD not in output
    assert tracking not in output
    assert "environment (values hidden): MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME" in (
        result.stderr
    )


def test_a_failing_job_fails_the_command_and_its_run(image, tracking):
    # -v: the job logs at DEBUG (LR_FINDER_LOG_LEVEL), and a secret stays masked in what it logs
    result = lr_finder(*run_args("failing", "-P", "lr=abc", "-v"), env=credentials(tracking), timeout=600)
    assert result.returncode != 0
    assert "error: invalid value for lr" in result.stdout
    (run,) = runs(tracking, "failing")
    assert run.info.status == "FAILED"
    assert re.search(r"^\S+ \S+ DEBUG [\w.]+: ", result.stdout, flags=re.MULTILINE), result.stdout[-3000:]
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "sig, when, line",
    [  # Ctrl-C early: only mlflow run knows the run, so the service ends it; SIGTERM later: the job ends its own
        (signal.SIGINT, "before the job attached to its run", "in run with ID"),
        (signal.SIGTERM, "while it trains", "reading fashion-mnist from /data"),
    ],
    ids=["ctrl-c early", "sigterm while training"],
)
def test_a_signal_stops_and_removes_the_container_and_the_run_ends_killed(
    engine, image, tracking, tmp_path, sig, when, line
):
    log, experiment = tmp_path / "run.log", f"stopped {when}"
    args = run_args(experiment, "-P", "epochs=20", "--name", "lrf-test-stopped")
    process = start(log, *args, env=credentials(tracking))
    try:
        wait_for(log, process, line)
        began = time.monotonic()
        process.send_signal(sig)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 128 + sig
    assert time.monotonic() - began < 45  # docker's 10 s stop timeout at most, removal, the run's record
    assert not engine.containers.list(all=True, filters={"name": "lrf-test-stopped"}), "the container is removed"
    (run,) = runs(tracking, experiment)
    assert run.info.status == "KILLED"
    assert f"lr-finder: run {run.info.run_id} KILLED" in log.read_text()


def test_resume_continues_a_stopped_run_in_the_container_to_its_end(image, tracking, tmp_path):
    # Schedule-Free AdamW: its averaged weights are what each checkpoint holds, and what the resumed fit goes on from
    job = small_job(train_subset=8000, epochs=4, auto_lr=False, optimizer="schedulefree")
    four_epochs = [a for p in as_mlflow_params(job) for a in ("-P", p)]
    log, experiment = tmp_path / "run.log", "resumed"
    process = start(log, *run_args(experiment, *four_epochs), env=credentials(tracking))
    try:
        wait_for(log, process, "in run with ID")
        (run_id,) = [run.info.run_id for run in runs(tracking, experiment)]
        deadline = time.monotonic() + 300
        while not steps(tracking, run_id, "epoch_seconds"):  # the first epoch has ended
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
    assert len(steps(tracking, run_id, "val_acc")) < 4, "it stopped before its last epoch"
    # A relative folder: the run's dataset, bound from the working directory (never an empty volume of that name).
    again = [arg if arg != str(FASHION_DIR) else FASHION_DIR.name for arg in run_args(experiment)]
    again = [arg for arg in again if arg not in ("--experiment-name", experiment)]
    result = lr_finder(*again, "--resume", run_id, env=credentials(tracking), cwd=FASHION_DIR.parent, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"mounts: {FASHION_DIR} -> /data (ro)" in result.stderr
    assert f"job: python -m mlproject train --resume {run_id}" in result.stderr
    (run,) = runs(tracking, experiment)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert steps(tracking, run_id, "val_acc") == [0, 1, 2, 3], "every epoch once"
    assert run.data.params["lr_source"] == "lr-free" and float(run.data.params["lr_used"]) == 0.0025
    assert run.data.tags["optimizer_class"] == "schedulefree.adamw_schedulefree.AdamWScheduleFree"
    assert run.data.metrics["test_acc"] > 0.7
    assert f"lr-finder: run {run_id} FINISHED" in result.stderr


def test_a_run_killed_with_sigkill_leaves_its_container_which_the_next_run_clears(engine, image, tracking, tmp_path):
    name, log = "lrf-test-sigkilled", tmp_path / "run.log"
    process = start(log, *run_args("sigkilled", "-P", "epochs=20", "--name", name), env=credentials(tracking))
    try:
        wait_for(log, process, "in run with ID")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        left = engine.containers.get(name)
        assert left.status == "running", "nothing stopped the container"
        refused = lr_finder(*run_args("sigkilled", "-P", "lr=abc", "--name", name), env=credentials(tracking))
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines()[-1] == (
            f"Error: a container named {name} is still running (an earlier lr-finder run): `docker stop {name}` ends it"
        )
        left.stop(timeout=30)
        left.reload()
        assert left.status == "exited"
        cleared = lr_finder(*run_args("sigkilled", "-P", "lr=abc", "--name", name), env=credentials(tracking))
        assert f"lr-finder: removed the exited container {name} that an earlier run left" in cleared.stdout
        assert "error: invalid value for lr" in cleared.stdout, "the new job ran under the name"
        assert not engine.containers.list(all=True, filters={"name": name})
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(docker.errors.NotFound):
            engine.containers.get(name).remove(force=True)


def test_run_pulls_a_missing_image_and_fails_in_one_line_when_it_cannot(engine):
    absent = "lr-finder-test-absent:never"
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    result = lr_finder("run", "--image", absent, "--gpus", "none", "--data", "", env=env, timeout=300)
    assert result.returncode == 1
    assert f"lr-finder: pulling {absent} (not on this engine)" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: no image {absent} here, and pulling it failed (")
    assert last.endswith(f"build it (lr-finder build --tag {absent}), or docker login to its registry")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registry on loopback (Debian's docker-registry), which the engine trusts without TLS."""
    if not shutil.which("docker-registry"):
        pytest.skip("no docker-registry to pull from: apt-get install docker-registry (.ci/setup --tests does)")
    folder, port = tmp_path_factory.mktemp("registry"), free_port()
    config = folder / "config.yml"
    config.write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {folder}/data\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    with serving(["docker-registry", "serve", str(config)], port, "the registry"):
        yield f"127.0.0.1:{port}"


@pytest.fixture
def pushed(engine, base_image, registry) -> Iterator[str]:
    """An image only the registry holds: the base plus a 20 MB layer of its own, pushed, then removed here."""
    ref = f"{registry}/lrf-test-pull:{uuid.uuid4().hex[:8]}"
    dockerfile = f'FROM {base_image}\nRUN head -c 20000000 /dev/urandom > /blob\nENTRYPOINT ["true"]\n'
    engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=ref, rm=True)
    for event in engine.api.push(ref, stream=True, decode=True):
        assert "error" not in event, event
    engine.images.remove(ref)
    try:
        yield ref
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            engine.images.remove(ref)


def test_run_and_build_show_a_pulls_layers_and_megabytes(engine, pushed, tmp_path):
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    result = lr_finder("run", "--image", pushed, "--gpus", "none", "--data", "", env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]  # its entrypoint is `true`: no job, no run
    assert f"lr-finder: pulling {pushed} (not on this engine)" in result.stderr
    assert re.search(r"^layers 2/2 done, 20\.\d of 20\.\d MB downloaded$", result.stderr, re.M), result.stderr
    assert engine.images.get(pushed)
    engine.images.remove(pushed)
    (tmp_path / "Dockerfile").write_text(f"FROM {pushed}\n")
    built = lr_finder("build", "--context", str(tmp_path), "--tag", "lr-finder:test-from-pull", timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    engine.images.remove("lr-finder:test-from-pull")
    assert re.search(r"^layers 2/2 done, 20\.\d of 20\.\d MB downloaded$", built.stdout, re.M), built.stdout


# --- lr-finder doctor ------------------------------------------------------------------------------------------


def test_doctor_passes_with_a_reachable_server_credentials_and_the_dataset(image, tracking):
    args = ["--image", IMAGE, "--gpus", "none", "--network", "host", "--cpus", "1.5"]
    result = lr_finder("doctor", *args, env=credentials(tracking))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^ok +threads: 1 \(.*a quota of 1.5 \(/sys/fs/cgroup/", result.stdout, re.M), result.stdout
    for check in ("docker engine", "image", "tracking server", "data and code"):
        assert re.search(rf"^ok +{check}: ", result.stdout, flags=re.MULTILINE), check
    verdict = r"ok: model lenet on fashion-mnist from /data; LR set at .*; first batch \(64, 1, 28, 28\) and \(64,\)$"
    assert re.search(rf"^ok +data and code: {verdict}", result.stdout, re.M), result.stdout
    assert "GPU" not in result.stdout
    assert PASSWORD not in result.stdout + result.stderr


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder the image's user (uid 1000) can read: tmp_path's parents are this user's alone."""
    folder = Path(tempfile.mkdtemp(prefix="lrf-test-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


USER_MODULE = """import lightning.pytorch as L, torch


class Tiny(L.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr, self.net = lr, torch.nn.LazyLinear(2)
"""


def test_doctor_checks_an_image_folder_and_a_user_module_where_the_job_will_read_them(image, tracking, shared_folder):
    images = write_tiny_image_folder(shared_folder / "images")
    (shared_folder / "code").mkdir()
    (shared_folder / "code" / "nets.py").write_text(USER_MODULE)
    args = ["--data", str(images), "--code", str(shared_folder / "code"), "-P", "dataset=imagefolder"]
    args += ["-P", "model=nets.Tiny", "-v"]  # the job's debug lines must not hide its verdict
    result = lr_finder(
        "doctor", "--image", IMAGE, "--gpus", "none", "--network", "host", *args, env=credentials(tracking)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    verdict = "ok: model nets.Tiny (LightningModule) on the image folder /data: "
    assert re.search(rf"^ok +data and code: {re.escape(verdict)}.*2 classes", result.stdout, re.M), result.stdout


def test_doctor_names_each_failure_with_a_fix(engine, image, tracking):
    gpu_runtime = "nvidia" in (engine.info().get("Runtimes") or {})
    env = {"MLFLOW_TRACKING_URI": tracking}  # no credentials: the server answers 401
    wrong = ["--code", str(REPO / "examples" / "tabular"), "-P", "model=tabular.NoSuchModule"]
    result = lr_finder("doctor", "--image", IMAGE, "--network", "host", *wrong, env=env)
    assert result.returncode == 1
    out = result.stdout
    assert re.search(r"^FAIL +tracking server: .*401", out, flags=re.MULTILINE), out
    assert re.search(r"^FAIL +data and code: error: invalid value for model: 'tabular.NoSuchModule'", out, re.M), out
    assert re.search(r"^      fix: pass --data DIR .*--code DIR .*-P key=value", out, flags=re.MULTILINE), out
    assert out.count("      fix: ") == out.count("FAIL")
    if not gpu_runtime:
        assert re.search(r"^FAIL +GPU in a container: .*could not select device driver", out, flags=re.MULTILINE)
        assert "NVIDIA container toolkit" in out
