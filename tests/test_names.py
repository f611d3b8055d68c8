"""Names MLflow refuses: what the tracker stores instead (pure), and a key the store refuses all the same, against a
real sqlite store: that key alone is dropped, said once, and every other value of the run arrives."""

from __future__ import annotations

import logging

import pytest
from mlflow.tracking import MlflowClient

from mlproject.record.names import Renames, storable
from mlproject.record.tracker import RunTracker


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("val_acc", "val_acc"),
        ("train/loss", "train/loss"),
        ("step:lr-0.1 x", "step:lr-0.1 x"),
        ("val error (%)", "val error ___"),
        ("précision", "précision"),  # a letter in any script is a letter to MLflow too
        ("loss\\n", "loss_n"),
        ("a/../b", "a_.._b"),
        ("/abs", "_abs"),
        ("..", "_.."),
        ("", "_"),
        ("x" * 300, "x" * 250),
    ],
)
def test_a_name_is_stored_as_itself_where_mlflow_takes_it_and_changed_only_where_it_does_not(name, stored):
    assert storable(name) == stored


def test_every_stored_name_is_one_mlflow_takes(tmp_path):
    names = ["val error (%)", "a/../b", "/abs", "..", ".", "", "x" * 300, "a//b", "ok name", "ü/ß:1"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("names")).info.run_id
    for step, name in enumerate(names):
        client.log_metric(run_id, storable(name), 1.0, step=step)  # raises where MLflow refuses the name
    assert len(client.get_run(run_id).data.metrics) == len(set(map(storable, names)))


class AsGiven(Renames):
    """Every name as the module logged it: the store's refusal itself, as a server with stricter rules answers."""

    def __call__(self, name: str) -> str:
        return name


def test_a_key_the_store_refuses_costs_that_key_alone_said_once(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = RunTracker.open(uri, "", "refused")
    tracker.metrics.renames = AsGiven()
    with caplog.at_level(logging.WARNING):
        for epoch in range(3):
            tracker.log_metrics({"train_loss": 1.0 / (epoch + 1), "val error (%)": 50.0, "val_loss": 2.0}, step=epoch)
    tracker.end("FINISHED")
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train_loss")] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(tracker.run_id, "val_loss")] == [0, 1, 2]
    refused = [r for r in caplog.records if "refused by the tracking store" in r.getMessage()]
    assert len(refused) == 1 and "'val error (%)'" in refused[0].getMessage()
    assert not any("unreachable" in r.getMessage() for r in caplog.records)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
