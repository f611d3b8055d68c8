"""The tracker in this process against a real sqlite store, at the moments a job cannot choose: another job makes the
experiment between this one's look-up and its create, the store is busy when the run's end is written, two resumes
claim one run at once. No dataset, no training: the moments are made certain by wrapping MLflow's own client or
by a barrier."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.client import TrackingServiceClient

from mlproject.config import ConfigError
from mlproject.record import ownership
from mlproject.record.tracker import RunTracker


def test_a_job_that_loses_the_race_to_make_its_experiment_runs_in_it(tmp_path, monkeypatch):
    """The moment of the race above, made certain: another job makes the experiment between this job's look-up
    and its own create. The run must still go to that experiment, not to MLflow's Default one."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    made = client.create_experiment("faults")  # the other job's, made after this job looked
    looked: list[str] = []
    real = TrackingServiceClient.get_experiment_by_name

    def first_not_there_yet(self, name):
        looked.append(name)
        return None if len(looked) == 1 else real(self, name)

    monkeypatch.setattr(TrackingServiceClient, "get_experiment_by_name", first_not_there_yet)
    tracker = RunTracker.open(uri, "", "faults")
    tracker.end("FINISHED")
    assert looked[0] == "faults"
    assert client.get_run(tracker.run_id).info.experiment_id == made


def test_a_run_whose_first_try_to_record_its_end_fails_still_ends_with_its_status(tmp_path, monkeypatch):
    """The store is busy (sqlite locked by another writer, a server restarting) at the moment the run ends: the
    write is retried, and the run must not stay RUNNING."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tries: list[str] = []
    real = TrackingServiceClient.set_terminated

    def busy_once(self, run_id, status=None, end_time=None):
        tries.append(status)
        if len(tries) == 1:
            raise MlflowException("(sqlite3.OperationalError) database is locked", TEMPORARILY_UNAVAILABLE)
        return real(self, run_id, status, end_time)

    monkeypatch.setattr(TrackingServiceClient, "set_terminated", busy_once)
    tracker = RunTracker.open(uri, "", "faults")
    tracker.end("KILLED", error="stopped by SIGTERM")
    assert tries[:2] == ["KILLED", "KILLED"]
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "KILLED"
    assert mlflow.active_run() is None  # and the process holds no run open


def stopped_run(uri: str, tmp_path, cut_to: int = 0) -> str:
    """A run that stopped after an epoch: KILLED, with its checkpoint (its first `cut_to` bytes, where given)."""
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("resumes")).info.run_id
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}, "epoch": 1}, checkpoint)
    if cut_to:
        checkpoint.write_bytes(checkpoint.read_bytes()[:cut_to])
    client.log_artifact(run_id, str(checkpoint), "checkpoints")
    client.set_terminated(run_id, "KILLED")
    return run_id


def test_of_two_resumes_claiming_one_stop_at_the_same_moment_exactly_one_takes_it(tmp_path):
    """Released by one barrier, so that both read the run before either writes: the store's write-once param is
    the claim, and the one it refuses stops in one line naming the other."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = stopped_run(uri, tmp_path)
    start, outcomes = threading.Barrier(2), []

    def resume() -> None:
        into = tmp_path / threading.current_thread().name
        start.wait()
        try:
            ownership.claim(uri, run_id, into)
            outcomes.append("took it")
        except ConfigError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=resume) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes)[1] == "took it"
    assert "a run no other resume has taken" in sorted(outcomes)[0] and ownership.owner() in sorted(outcomes)[0]
    claims = [k for k in MlflowClient(uri).get_run(run_id).data.params if k.startswith("resumed_by.")]
    assert len(claims) == 1


def test_a_claim_whose_resume_died_before_training_does_not_block_the_next(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = stopped_run(uri, tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process holds now
    client = MlflowClient(uri)
    end = client.get_run(run_id).info.end_time
    client.log_param(run_id, f"resumed_by.{end}.1", f"{socket.gethostname()}:{gone.pid} {time.time():.0f} dead")
    ownership.claim(uri, run_id, tmp_path / "resume")
    run = client.get_run(run_id)
    assert run.data.params[f"resumed_by.{end}.2"].startswith(ownership.owner() + " ")
    assert run.data.tags[ownership.OWNER_TAG] == ownership.owner()


def running_run(uri: str, owner: str, heartbeat: float) -> str:
    """A RUNNING run as a job leaves it: its owner and its last heartbeat."""
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("owners")).info.run_id
    client.set_tag(run_id, ownership.OWNER_TAG, owner)
    client.set_tag(run_id, ownership.HEARTBEAT_TAG, f"{heartbeat:.0f}")
    return run_id


def test_a_dead_jobs_pid_held_by_another_process_does_not_keep_its_run_open(tmp_path):
    """The job that owned the run is gone, and its PID now belongs to an unrelated process (started later): the
    run is closed, not refused as still running."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    other = subprocess.Popen(["sleep", "60"])
    try:
        boot = ownership.incarnation(other.pid).split(".")[0]
        gone_owner = f"{socket.gethostname()}:{other.pid}:{boot}.1"  # that PID, started at the boot: not `sleep`
        run_id = running_run(uri, gone_owner, heartbeat=time.time() - 600)
        assert ownership.close_run(uri, run_id, time.time()) == "FAILED"
    finally:
        other.kill()
        other.wait()
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"


def test_a_run_whose_process_still_runs_here_is_not_closed_whatever_its_heartbeat_says(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = running_run(uri, ownership.owner(), heartbeat=time.time() - 600)
    with pytest.raises(ConfigError, match="still runs it"):
        ownership.close_run(uri, run_id, time.time())
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"


def test_a_checkpoint_cut_short_is_refused_before_the_run_is_claimed(tmp_path):
    """A store that filled during the upload left part of last.ckpt: resume says so in one line and takes nothing."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = stopped_run(uri, tmp_path, cut_to=600)
    with pytest.raises(ConfigError, match=r"checkpoints/last.ckpt is cut short or no checkpoint: 600 bytes"):
        ownership.claim(uri, run_id, tmp_path / "resume")
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED" and not [k for k in run.data.params if k.startswith("resumed_by.")]
