"""The tracker in this process against a real sqlite store, at the moments a job cannot choose: another job makes the
experiment between this one's look-up and its create, the store is busy when the run's end is written. No dataset,
no training: the moments are made certain by wrapping MLflow's own client."""

from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.client import TrackingServiceClient

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
