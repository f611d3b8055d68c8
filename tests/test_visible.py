"""What a person sees: a line per epoch and the range test's story in the terminal, log levels, --version; the range
test as metrics MLflow's charts overlay, system metrics, run names that say what the run is, a registered model."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from mlproject import progress
from mlproject.config import JobConfig
from mlproject.plots import merge_marks
from mlproject.session import default_name
from tests.helpers import (
    BIN,
    as_options,
    finish,
    job_env,
    mlflow_run,
    requires_fashion_mnist,
    runs_of,
    small_job,
    start_job,
)


def test_an_epoch_line_names_the_figures_the_lr_the_seconds_and_the_time_left():
    metrics = {"train_loss": 0.41234, "val_loss": 0.39, "val_acc": 0.8612, "val_mae": 2.5, "learning_rate": 0.0065,
               "epoch_seconds": 4.21}  # fmt: skip
    line = progress.epoch_line(1, 4, metrics, elapsed=8.4)
    assert (
        line
        == "epoch 2/4: train_loss 0.4123, val_loss 0.39, val_acc 0.8612, val_mae 2.5, lr 0.0065; 4.2 s, about 8 s left"
    )
    assert progress.epoch_line(3, 4, metrics, elapsed=16.0).endswith("; 4.2 s")  # the last: nothing left


@pytest.mark.parametrize(
    "asked, terminal, shown",
    [("auto", True, "bar"), ("auto", False, "lines"), ("lines", True, "lines"), ("off", True, "off")],
)
def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log(asked, terminal, shown):
    assert progress.mode(asked, terminal) == shown


def test_run_names_say_what_the_run_is():
    assert default_name(JobConfig(auto_lr=True), "train") == "lenet-adam-finder"
    assert default_name(JobConfig(model="resnet18", optimizer="sgd", lr=0.01), "train") == "resnet18-sgd-lr=0.01"
    assert default_name(JobConfig(model="pkg.mod.TabularRegressor", auto_lr=True), "train") == "TabularRegressor-finder"
    assert default_name(JobConfig(), "compare") == "lenet-adam-study"


def test_marks_that_fall_on_one_lr_are_drawn_once_with_both_names():
    merged = merge_marks([("suggested", 0.004, {}), ("used by the fit", 0.00401, {}), ("steepest", 0.001, {})])
    assert [(names, value) for names, value, _ in merged] == [(["suggested", "used by the fit"], 0.004),
                                                              (["steepest"], 0.001)]  # fmt: skip


@pytest.mark.parametrize("command", [["lr-finder-job"], ["lr-finder"], [sys.executable, "-m", "mlproject"]])
def test_both_command_lines_say_their_version_and_name_themselves(command):
    from mlproject import __version__

    argv = [str(BIN / command[0]), *command[1:]] if len(command) == 1 else command
    version = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip().endswith(__version__)
    helped = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
    name = "python -m mlproject" if len(command) > 1 else command[0]
    assert helped.stdout.startswith(f"Usage: {name} ")


@requires_fashion_mnist
def test_the_job_tells_its_story_a_line_per_epoch_at_the_level_asked(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = start_job(tmp_path, "train", *as_options(small_job(epochs=2)), env=job_env(uri))
    code, _, err = finish(job)
    assert code == 0, err[-3000:]
    lines = err.splitlines()
    # lr_steps=20 over six decades is too sparse to read: the job says it sweeps 8 a decade, and why
    assert any(" INFO mlproject.finder.choose: range test: 48 steps, not lr_steps=20: " in line for line in lines)
    assert any(" INFO mlproject.progress: range test: up to 48 steps from lr 1e-06 to 1" in line for line in lines)
    assert any(" INFO mlproject.finder.choose: range test: " in line and " steps in " in line for line in lines)
    epochs = [line.split("mlproject.progress: ", 1)[1] for line in lines if "mlproject.progress: epoch " in line]
    assert [e.split(":")[0] for e in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert "left" in epochs[0] and "val_acc" in epochs[0] and ", lr " in epochs[0]
    assert not any("pytorch_lightning" in line or "Creating initial MLflow database" in line for line in lines)

    quiet = start_job(tmp_path, "train", *as_options(small_job()), env=job_env(uri, LR_FINDER_LOG_LEVEL="WARNING"))
    code, _, err = finish(quiet)
    assert code == 0 and " INFO " not in err, err[-2000:]


@pytest.mark.slow
@requires_fashion_mnist
def test_the_range_test_as_metrics_system_metrics_a_name_and_a_registered_model(tmp_path):
    sampling = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"}
    params = [f"{k}={v}" for k, v in small_job(epochs=1).items()]
    result = mlflow_run(tmp_path, "visible", *params, "register_model=fashion-lenet", env=sampling)
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    (run,) = runs_of(uri, "visible")
    assert run.info.run_name == "lenet-adam-finder"  # mlflow run's random name, replaced by what the run is
    steps = len(client.get_metric_history(run.info.run_id, "lr_find_lr"))
    assert steps >= 10 and [m.step for m in client.get_metric_history(run.info.run_id, "lr_find_loss")] == list(
        range(steps)
    )
    assert any(key.startswith("system/") for key in run.data.metrics)
    (version,) = client.search_model_versions("name='fashion-lenet'")
    assert version.run_id == run.info.run_id and version.tags["lr_source"] == "finder" and "test_acc" in version.tags
