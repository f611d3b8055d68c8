"""End to end through `mlflow run . --env-manager local` on the real Fashion-MNIST; asserts the whole run contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mlproject.finder.rules import PEAK_CAP
from tests.helpers import REPO, artifact_paths, mlflow_run, requires_fashion_mnist, runs_of

pytestmark = [pytest.mark.slow, requires_fashion_mnist]
MAIN_PARAMS = [
    "auto_lr", "lr", "epochs", "batch_size", "optimizer", "schedule", "model", "seed", "dataset", "data_dir",
    "train_subset", "val_size", "lr_min", "lr_max", "lr_steps", "lr_method", "accelerator", "devices", "precision",
    "data_mode",
]  # fmt: skip


@pytest.fixture(scope="module")
def auto_lr_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("e2e")
    return tmp, mlflow_run(tmp, "e2e", "auto_lr=TRUE", "epochs=1")


def test_one_epoch_with_the_finder_finishes_one_run_above_85_percent(auto_lr_run):
    tmp, result = auto_lr_run
    assert result.returncode == 0, result.stderr[-3000:]
    runs = runs_of(f"sqlite:///{tmp}/mlflow.db", "e2e")
    assert len(runs) == 1, "exactly one run per invocation (no orphan run from Lightning)"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_acc"] >= 0.85
    assert f"run {run.info.run_id}: lr_used=" in result.stdout


def test_run_holds_every_param_and_the_chosen_lr(auto_lr_run):
    tmp, _ = auto_lr_run
    params = runs_of(f"sqlite:///{tmp}/mlflow.db", "e2e")[0].data.params
    assert set(MAIN_PARAMS) <= set(params)
    assert params["auto_lr"] == "TRUE"  # as typed: MLflow logs -P values verbatim and params are write-once
    assert params["lr_source"] == "finder"
    assert params["lr_method"] == "combined"
    suggested, used = float(params["lr_suggested"]), float(params["lr_used"])
    # the one-cycle peak, 1x to PEAK_CAP x the suggestion (both params rounded to 6 digits)
    assert 1e-5 < suggested < 1e-1 and suggested <= used <= PEAK_CAP * suggested * (1 + 1e-5)
    for key in ("final_val_acc", "final_val_loss", "test_acc", "test_loss"):
        assert 0 < float(params[key]) < 5


def test_run_holds_epoch_metrics_final_metrics_and_tags(auto_lr_run):
    tmp, _ = auto_lr_run
    run = runs_of(f"sqlite:///{tmp}/mlflow.db", "e2e")[0]
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    for key in ("train_loss", "val_loss", "val_acc", "learning_rate"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0], key
        assert np.isfinite(history[0].value)
    assert run.data.metrics["lr_suggested"] == pytest.approx(float(run.data.params["lr_suggested"]), rel=1e-3)
    assert run.data.metrics["test_loss"] > 0
    for tag in ("torch_version", "lightning_version", "mlflow_version", "device"):
        assert run.data.tags[tag]
    assert run.data.tags["mlflow.project.entryPoint"] == "main"


def test_run_holds_the_range_test_artifacts(auto_lr_run):
    tmp, _ = auto_lr_run
    run = runs_of(f"sqlite:///{tmp}/mlflow.db", "e2e")[0]
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    paths = artifact_paths(client, run.info.run_id)
    assert {"config.json", "lr_find/loss_vs_lr.png", "lr_find/curve.csv", "lr_find/summary.json"} <= paths
    local = Path(client.download_artifacts(run.info.run_id, "lr_find", str(tmp / "dl")))
    assert (local / "loss_vs_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((local / "summary.json").read_text())
    assert summary["suggestion"] == pytest.approx(float(run.data.params["lr_suggested"]), rel=1e-3)
    assert summary["steps_requested"] == 100 and 5 <= summary["steps_run"] <= 100
    keys = {"method", "fallback_reason", "lr_min", "lr_max", "stopped_on_divergence", "stop_reason", "candidates"}
    assert keys <= set(summary)
    rows = (local / "curve.csv").read_text().splitlines()
    assert rows[0] == "step,lr,loss,smoothed_loss" and len(rows) == summary["steps_run"] + 1
    assert not list(REPO.glob(".lr_find_*.ckpt")), "the range test leaves no checkpoint behind"


def test_run_holds_the_model_and_the_dataset(auto_lr_run):
    tmp, _ = auto_lr_run
    run = runs_of(f"sqlite:///{tmp}/mlflow.db", "e2e")[0]
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"training", "validation", "test"}
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [run.info.run_id]
    model = mlflow.pyfunc.load_model(models[0].model_uri)
    assert model.metadata.signature is not None
    out = model.predict(np.zeros((3, 1, 28, 28), dtype=np.float32))
    assert np.asarray(out).shape == (3, 10)
    # It loads where this package is not installed (a server, a notebook): the network holds a module of ours.
    elsewhere = (
        "import sys, mlflow, numpy as np; sys.modules['mlproject'] = None; "
        f"mlflow.set_tracking_uri('sqlite:///{tmp}/mlflow.db'); m = mlflow.pyfunc.load_model('{models[0].model_uri}'); "
        "print(np.asarray(m.predict(np.zeros((2, 1, 28, 28), dtype=np.float32))).shape)"
    )
    loaded = subprocess.run([sys.executable, "-c", elsewhere], capture_output=True, text=True, cwd=tmp, timeout=300)
    assert loaded.stdout.strip().endswith("(2, 10)"), loaded.stderr[-2000:]


def test_lr_find_entry_point_logs_the_curve_and_trains_nothing(tmp_path):
    result = mlflow_run(tmp_path, "find", "train_subset=3000", entry="lr_find")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(f"sqlite:///{tmp_path}/mlflow.db", "find")
    assert run.info.status == "FINISHED"
    assert "lr_suggested" in run.data.params and "test_acc" not in run.data.metrics
    paths = artifact_paths(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), run.info.run_id)
    assert "lr_find/loss_vs_lr.png" in paths


@pytest.mark.parametrize(
    "param, expect", [("lr=abc", "lr"), ("lr_min=1", "lr_min"), ("optimizer=rmsprop", "optimizer")]
)
def test_bad_parameter_through_mlflow_run_ends_the_run_failed_with_the_reason(tmp_path, param, expect):
    result = mlflow_run(tmp_path, "bad", param)
    assert result.returncode != 0
    assert f"error: invalid value for {expect}" in result.stderr
    (run,) = runs_of(f"sqlite:///{tmp_path}/mlflow.db", "bad")
    assert run.info.status == "FAILED"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    error = Path(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path / "dl"))).read_text()
    assert expect in error
