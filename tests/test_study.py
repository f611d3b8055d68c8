"""The LR study (`compare` entry point): child runs under one parent, comparison artifacts, failures kept."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import as_mlflow_params, as_options, job_env, mlflow_run, requires_fashion_mnist, small_job

pytestmark = [pytest.mark.slow, requires_fashion_mnist]


def family(client: MlflowClient, experiment: str) -> tuple[object, list]:
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def test_compare_makes_one_child_per_lr_plus_the_finder_with_main_run_keys(tmp_path):
    result = mlflow_run(tmp_path, "study", "lrs=1e-4,1e-1", *as_mlflow_params(small_job()), entry="compare")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent, children = family(client, "study")
    assert parent.info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == ["lr=0.0001", "lr=0.1", "lr=finder"]
    assert all(c.info.status == "FINISHED" for c in children)
    sources = {c.info.run_name: c.data.params["lr_source"] for c in children}
    assert sources == {"lr=0.0001": "fixed", "lr=0.1": "fixed", "lr=finder": "finder"}
    keys = {"lr_used", "lr_source", "test_acc", "final_val_acc", "optimizer", "epochs"}
    assert all(keys <= set(c.data.params) for c in children)
    assert {"lr_suggested", "lr_method"} <= set(next(c for c in children if c.info.run_name == "lr=finder").data.params)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "comparison.png", "comparison.csv", "comparison.md"
    }  # fmt: skip
    local = Path(client.download_artifacts(parent.info.run_id, "comparison.csv", str(tmp_path)))
    table = list(csv.DictReader(io.StringIO(local.read_text())))
    assert [row["label"] for row in table] == ["lr=0.0001", "lr=0.1", "lr=finder"]
    by_label = {c.info.run_name: c for c in children}
    for row in table:
        assert float(row["test_acc"]) == pytest.approx(by_label[row["label"]].data.metrics["test_acc"], abs=1e-4)


def test_a_failing_member_ends_failed_and_the_study_finishes(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = as_options(small_job(auto_lr=False, optimizer="sgd"))
    cmd = [sys.executable, "-m", "mlproject", "compare", "--experiment-name", "study"]
    result = subprocess.run(
        [*cmd, *args, "--lrs", "0.01,10000"], cwd=tmp_path, env=job_env(uri), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| lr=10000 | 1e+04 | fixed | FAILED | - | - | - |" in result.stdout
    parent, children = family(MlflowClient(uri), "study")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["members_failed"] == "1"
    status = {c.info.run_name: c.info.status for c in children}
    assert status == {"lr=0.01": "FINISHED", "lr=10000": "FAILED"}


def test_bad_lrs_is_a_usage_error(tmp_path):
    cmd = [sys.executable, "-m", "mlproject", "compare", "--lrs", "1e-4,abc"]
    result = subprocess.run(
        cmd, cwd=tmp_path, env=job_env(f"sqlite:///{tmp_path}/m.db"), capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: invalid value for lrs: '1e-4,abc'; expected a comma-separated list of learning rates > 0, "
        "e.g. 1e-5,1e-4,1e-1"
    ]
