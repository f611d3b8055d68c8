"""Faults with real processes: preemption by a real SIGTERM and resume, an unreachable server, secrets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import (
    as_options,
    finish,
    free_port,
    job_env,
    requires_fashion_mnist,
    small_job,
    start_job,
    wait_for_metric,
)

pytestmark = [pytest.mark.slow, requires_fashion_mnist]
# Four epochs of a few seconds each: time to stop one midway.
FOUR_EPOCHS = as_options(small_job(train_subset=20000, val_size=2000, epochs=4, lr_steps=30))


def job(tmp: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return start_job(tmp, "train", *args, env=env, experiment="faults")


def test_sigterm_keeps_a_checkpoint_ends_killed_and_resume_gives_the_same_result(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    proc = job(tmp_path, *FOUR_EPOCHS, env=job_env(uri))
    run_id = wait_for_metric(client, "faults", "epoch_seconds")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc, timeout=60)
    stopped_in = time.monotonic() - sent
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert stopped_in < 30  # the wind-down: checkpoint upload, ending the run, interpreter exit
    assert len(client.get_metric_history(run_id, "val_acc")) < 4  # it stopped before the job's last epoch
    assert "SIGTERM" in err.strip().splitlines()[-1]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert "checkpoints/last.ckpt" in {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    error = Path(client.download_artifacts(run_id, "error.txt", str(tmp_path))).read_text()
    assert f"resume={run_id}" in error

    code, out, err = finish(job(tmp_path, "--resume", run_id, env=job_env(uri)))
    assert code == 0, err[-2000:]
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed"] == "true"
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [0, 1, 2, 3]

    code, out, err = finish(job(tmp_path, *FOUR_EPOCHS, env=job_env(uri)))  # the same job, never interrupted
    assert code == 0, err[-2000:]
    straight = client.get_run(out.split()[1].rstrip(":"))
    for key in ("test_acc", "test_loss", "final_val_acc", "final_val_loss", "lr_used"):
        assert resumed.data.params[key] == straight.data.params[key], key


def test_unreachable_tracking_server_fails_fast_naming_it(tmp_path):
    uri = "http://127.0.0.1:9"  # the discard port: nothing listens
    start = time.monotonic()
    code, _, err = finish(job(tmp_path, env=job_env(uri)), timeout=120)
    assert code == 1
    assert time.monotonic() - start < 60  # the 20 s probe, plus interpreter start and imports on a loaded machine
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: tracking server http://127.0.0.1:9 unreachable")


def test_tracking_credentials_appear_nowhere(tmp_path):
    secret = "s3cret-Pa55-4711"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = job_env(uri, MLFLOW_TRACKING_USERNAME="team", MLFLOW_TRACKING_PASSWORD=secret, MLFLOW_TRACKING_TOKEN=secret)
    code, out, err = finish(job(tmp_path, *as_options(small_job()), env=env))
    assert code == 0, err[-2000:]
    assert secret not in out + err
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert secret not in repr(run.data.params) + repr(run.data.tags)
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "all")))
    for path in local.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def start_server(tmp: Path, port: int) -> subprocess.Popen:
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    cmd = [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{tmp}/server.db", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"]
    log = open(tmp / f"server-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(port: int, timeout: float = 120) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError("mlflow server never answered")


def test_server_down_mid_run_loses_no_metric(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server, proc = start_server(tmp_path, port), None
    try:
        wait_healthy(port)
        proc = job(tmp_path, *FOUR_EPOCHS, env=job_env(uri))
        run_id = wait_for_metric(MlflowClient(uri), "faults", "epoch_seconds")
        epoch = MlflowClient(uri).get_metric_history(run_id, "epoch_seconds")[0].value
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, without warning
        server.wait()
        time.sleep(20 + 1.5 * epoch)  # down for 20 s, and across at least one epoch's end
        server = start_server(tmp_path, port)
        wait_healthy(port)
        code, _, err = finish(proc)
        assert code == 0, err[-3000:]
        assert "tracking server unreachable" in err  # it noticed, and carried on
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
        assert run.info.status == "FINISHED"
        for key in ("train_loss", "val_loss", "val_acc", "epoch_seconds"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2, 3], key
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        if proc is not None and proc.poll() is None:  # a failed check must not leave the job retrying for minutes
            proc.kill()
