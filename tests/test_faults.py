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
    BIN,
    REPO,
    as_mlflow_params,
    as_options,
    finish,
    free_port,
    job_env,
    requires_fashion_mnist,
    runs_of,
    small_job,
    start_job,
    wait_for_line,
    wait_for_metric,
)

pytestmark = [pytest.mark.slow, requires_fashion_mnist]
# Four epochs of about a second each: time to stop one midway.
FOUR_EPOCHS = as_options(small_job(train_subset=10000, val_size=1000, epochs=4, lr_steps=30))


def job(tmp: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return start_job(tmp, "train", *args, env=env, experiment="faults")


def test_sigterm_keeps_a_checkpoint_ends_killed_and_resume_gives_the_same_result(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    proc = job(tmp_path, *FOUR_EPOCHS, env=job_env(uri))
    run_id = wait_for_metric(client, "faults", "epoch_seconds", process=proc)
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


SECRET = "s3cret-Pa55-4711"


@pytest.fixture(scope="module")
def job_with_credentials(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """One small job on a new local store, with credentials in its environment (which the store does not need):
    its folder, and what it wrote to stdout and stderr."""
    tmp = tmp_path_factory.mktemp("credentials")
    uri = f"sqlite:///{tmp}/private.db"
    env = job_env(uri, MLFLOW_TRACKING_USERNAME="team", MLFLOW_TRACKING_PASSWORD=SECRET, MLFLOW_TRACKING_TOKEN=SECRET)
    code, out, err = finish(job(tmp, *as_options(small_job()), env=env))
    assert code == 0, err[-2000:]
    return tmp, out, err


def test_tracking_credentials_appear_nowhere(job_with_credentials):
    tmp, out, err = job_with_credentials
    assert SECRET not in out + err
    client = MlflowClient(f"sqlite:///{tmp}/private.db")
    (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert SECRET not in repr(run.data.params) + repr(run.data.tags)
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp / "all")))
    for path in local.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


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
    server, proc, log = start_server(tmp_path, port), None, tmp_path / "job.log"
    try:
        wait_healthy(port)
        with log.open("w") as out:
            cmd = [sys.executable, "-m", "mlproject", "train", "--experiment-name", "faults", *FOUR_EPOCHS]
            proc = subprocess.Popen(
                cmd, cwd=tmp_path, env=job_env(uri), stdout=out, stderr=subprocess.STDOUT, text=True
            )
        wait_for_metric(MlflowClient(uri), "faults", "epoch_seconds", process=proc)
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, without warning
        server.wait()
        wait_for_line(proc, log, "tracking server unreachable", timeout_s=120)  # an epoch ended while it was down
        server = start_server(tmp_path, port)
        wait_healthy(port)
        code = proc.wait(timeout=600)
        err = log.read_text()
        assert code == 0, err[-3000:]
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
        assert run.info.status == "FINISHED"
        for key in ("train_loss", "val_loss", "val_acc", "epoch_seconds"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2, 3], key
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        if proc is not None and proc.poll() is None:  # a failed check must not leave the job retrying for minutes
            proc.kill()


# --- signals under `mlflow run`, and what a stop leaves ----------------------------------------------------------


def mlflow_run_process(tmp: Path, *params: str, experiment: str = "faults") -> subprocess.Popen:
    """`mlflow run` as a user types it, in its own process group (a terminal's), output captured. The store is made
    first: `mlflow run` and this test's client would otherwise both migrate a new sqlite file at once."""
    uri = f"sqlite:///{tmp}/mlflow.db"
    MlflowClient(uri).search_experiments(max_results=1)
    env = {**job_env(uri), "PATH": f"{BIN}:{os.environ['PATH']}"}
    args = [str(BIN / "mlflow"), "run", str(REPO), "--env-manager", "local", "--experiment-name", experiment]
    for p in params:
        args += ["-P", p]
    return subprocess.Popen(args, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def job_pid(run_id: str) -> int | None:
    """The job process writing to `run_id`, found by its environment (mlflow run hands it MLFLOW_RUN_ID)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            text = environ.read_bytes().decode(errors="replace")
            cmdline = (environ.parent / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if f"MLFLOW_RUN_ID={run_id}" in text.split("\0") and "mlproject" in cmdline and "mlflow\0run" not in cmdline:
            return int(environ.parent.name)
    return None


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            return True
        time.sleep(0.2)
    return False


def test_killing_mlflow_run_stops_its_job_within_seconds_and_the_run_ends_killed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    launcher = mlflow_run_process(tmp_path, *as_mlflow_params(small_job(train_subset=10000, epochs=4)))
    run_id = wait_for_metric(MlflowClient(uri), "faults", "epoch_seconds", process=launcher)
    pid = job_pid(run_id)
    assert pid is not None
    launcher.send_signal(signal.SIGTERM)  # `mlflow run` alone, as `kill PID` does
    launcher.communicate(timeout=60)
    assert gone_within(pid, 30), "the job trained on without its launcher"
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"


def test_ctrl_c_under_mlflow_run_records_the_stop_and_exits_130(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    launcher = mlflow_run_process(tmp_path, *as_mlflow_params(small_job(train_subset=10000, epochs=4)))
    client = MlflowClient(uri)
    run_id = wait_for_metric(client, "faults", "epoch_seconds", process=launcher)
    os.killpg(launcher.pid, signal.SIGINT)  # the terminal's Ctrl-C: every process of the foreground group
    _, err = launcher.communicate(timeout=90)
    assert launcher.returncode == 1  # mlflow run's, whether it saw the interrupt or the job's exit first
    assert "error: stopped by SIGINT; the run ended KILLED" in err
    # The job ends the run KILLED; `mlflow run` then marks a run it saw interrupted FAILED over it (MLflow's own
    # choice for a KeyboardInterrupt). What the run keeps says what happened and how to go on.
    assert client.get_run(run_id).info.status in ("KILLED", "FAILED")
    note = Path(client.download_artifacts(run_id, "error.txt", str(tmp_path))).read_text()
    assert note.strip() == f"stopped by SIGINT; continue it with resume={run_id}"


def test_a_stop_before_the_first_epoch_says_there_is_nothing_to_resume_and_resume_is_refused(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    # A first epoch of several seconds on a loaded core: the stop lands in it, after the range test.
    proc = job(tmp_path, *as_options(small_job(train_subset=50000, val_size=1000, epochs=2)), env=job_env(uri))
    run_id = wait_for_metric(
        client, "faults", "lr_suggested", process=proc
    )  # the range test is over; the first epoch is not
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc, timeout=60)
    assert code == 128 + signal.SIGTERM
    last = err.strip().splitlines()[-1]
    assert "no checkpoint to resume from: rerun it" in last and "continue" not in last
    assert "rerun it" in Path(client.download_artifacts(run_id, "error.txt")).read_text()
    assert client.list_artifacts(run_id, "checkpoints") == []
    code, _, err = finish(job(tmp_path, "--resume", run_id, env=job_env(uri)))
    assert code == 2 and err.strip().splitlines() == [
        f"error: invalid value for resume: '{run_id}'; expected a run with a checkpoint (it stopped before its first "
        "epoch ended: rerun it)"
    ]
    assert client.get_run(run_id).info.status == "KILLED"  # the refusal changed nothing


def test_a_job_killed_outright_is_told_apart_closed_and_resumed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    proc = job(tmp_path, *FOUR_EPOCHS, env=job_env(uri))
    run_id = wait_for_metric(client, "faults", "epoch_seconds", process=proc)
    proc.send_signal(signal.SIGSTOP)  # alive but still: it cannot end its run while the second job starts
    code, _, err = finish(job(tmp_path, "--resume", run_id, env=job_env(uri)))
    assert code == 2 and "still runs it" in err, err[-2000:]  # alive: no second writer
    proc.kill()  # SIGKILL: no handler runs, nothing is recorded
    proc.wait()
    assert client.get_run(run_id).info.status == "RUNNING"
    closed = subprocess.run([sys.executable, "-m", "mlproject", "close", run_id], env=job_env(uri), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert closed.returncode == 0 and f"run {run_id}: FAILED" in closed.stdout, closed.stderr
    assert "its process" in Path(client.download_artifacts(run_id, "error.txt")).read_text()
    code, _, err = finish(job(tmp_path, "--resume", run_id, env=job_env(uri)))
    assert code == 0, err[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "val_acc")]
    assert steps == sorted(set(steps)) and steps[-1] == 3  # every epoch once, none twice


def test_resume_is_refused_for_a_finished_run_and_for_two_resumes_at_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    proc = job(tmp_path, *FOUR_EPOCHS, env=job_env(uri))
    run_id = wait_for_metric(client, "faults", "epoch_seconds", process=proc)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, timeout=60)[0] == 128 + signal.SIGTERM
    first, second = (job(tmp_path, "--resume", run_id, env=job_env(uri)) for _ in range(2))
    results = sorted([finish(first), finish(second)], key=lambda r: r[0])
    assert [r[0] for r in results] == [0, 2], results[1][2][-2000:]
    assert "took it first" in results[1][2]
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [0, 1, 2, 3]
    code, _, err = finish(job(tmp_path, "--resume", run_id, env=job_env(uri)))
    assert code == 2 and "it is FINISHED" in err
    code, _, err = finish(job(tmp_path, *as_options(small_job()), env=job_env(uri, MLFLOW_RUN_ID=run_id)))
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: invalid value for MLFLOW_RUN_ID")
    assert client.get_run(run_id).info.status == "FINISHED"


# --- the range test's edges ------------------------------------------------------------------------------------


def summary_of(client: MlflowClient, run_id: str) -> dict:
    import json

    return json.loads(Path(client.download_artifacts(run_id, "lr_find/summary.json")).read_text())


def test_a_curve_still_falling_at_lr_max_gives_no_confident_answer(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = as_options(small_job(optimizer="sgd", lr_min=0.001, lr_max=0.1, lr_steps=30))
    code, _, err = finish(job(tmp_path, *args, env=job_env(uri)))
    assert code == 0, err[-3000:]
    (run,) = runs_of(uri, "faults")
    summary = summary_of(MlflowClient(uri), run.info.run_id)
    assert summary["confidence"] == 0.0 and "raise lr_max" in summary["reason"]
    assert float(run.data.params["lr_used"]) < 0.1
    assert "the sweep found no floor" in err


# --- secrets, stores, disks, concurrency -----------------------------------------------------------------------


def test_credentials_inside_the_tracking_uri_are_never_printed(tmp_path, team_server):
    uri, password = team_server.with_credentials(), team_server.password
    code, out, err = finish(start_job(tmp_path, "train", *as_options(small_job()), env=job_env(uri), experiment="uri"))
    assert code == 0, err[-3000:].replace(password, "***")
    assert password not in out + err


def test_the_local_sqlite_store_is_created_readable_by_its_user_alone(job_with_credentials):
    tmp, _, _ = job_with_credentials
    assert oct((tmp / "private.db").stat().st_mode & 0o777) == "0o600"


def test_jobs_started_together_on_a_new_sqlite_store_all_finish(tmp_path):
    uri = f"sqlite:///{tmp_path}/new.db"
    env = job_env(uri, OMP_NUM_THREADS="1")  # four jobs share two cores: a thread each, none spinning on another's
    jobs = [job(tmp_path, *as_options(small_job(seed=s, lr_steps=10, auto_lr=False)), env=env) for s in range(4)]
    results = [finish(p) for p in jobs]
    assert [code for code, _, _ in results] == [0, 0, 0, 0], [err[-800:] for _, _, err in results]
    assert sorted(r.info.status for r in runs_of(uri, "faults")) == ["FINISHED"] * 4


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_artifact_store_is_one_clear_error_at_once_and_the_run_ends_failed(tmp_path):
    store = tmp_path / "artifacts"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(store)], check=True)
    try:
        (store / "filler").write_bytes(b"\0" * (2 * 2**20 - 64 * 2**10))  # 64 KB left: less than the plot
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        MlflowClient(uri).create_experiment("faults", artifact_location=str(store))
        began = time.monotonic()
        code, _, err = finish(job(tmp_path, *as_options(small_job()), env=job_env(uri)), timeout=300)
        took = time.monotonic() - began
    finally:
        subprocess.run(["umount", str(store)], check=False)
    last = err.strip().splitlines()[-1]
    assert code == 1 and took < 120, (code, took, err[-3000:])
    assert last.startswith("error: ") and "the store is full" in last and str(store) in last
    assert "unreachable" not in err
    (run,) = runs_of(uri, "faults")
    assert run.info.status == "FAILED"
