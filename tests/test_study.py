"""The LR study (`compare` entry point): child runs under one parent, comparison artifacts, failures kept."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import (
    BIN,
    REPO,
    as_mlflow_params,
    as_options,
    job_env,
    mlflow_run,
    requires_fashion_mnist,
    small_job,
)

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
    assert "| lr=10000 | 1e+04 | fixed | FAILED | - | - | - | - |" in result.stdout
    parent, children = family(MlflowClient(uri), "study")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["members_failed"] == "1" and parent.data.tags["study_complete"] == "true"
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


def test_members_in_parallel_processes_attach_to_one_parent_and_the_last_writes_the_comparison(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*as_options(small_job()), "--lrs", "1e-3,1e-2", "--parallel", "2"]
    cmd = [sys.executable, "-m", "mlproject", "compare", "--experiment-name", "study", *args]
    result = subprocess.run(cmd, cwd=tmp_path, env=job_env(uri), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = family(MlflowClient(uri), "study")
    assert sorted(c.info.run_name for c in children) == ["lr=0.001", "lr=0.01", "lr=finder"]
    assert all(c.info.status == "FINISHED" for c in children)
    finder = next(c for c in children if c.info.run_name == "lr=finder")
    assert finder.data.params["lr_suggested"] == parent.data.params["lr_suggested"]  # one range test, the parent's
    assert parent.data.tags["study_complete"] == "true"
    assert {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id)} >= {"comparison.csv", "study.json"}


def test_a_ci_study_plan_then_one_job_per_member_against_a_tracking_server(tmp_path, team_server):
    """The GPU workflow's study mode, its jobs' commands run as processes: a plan job, then the members."""
    env = {**job_env(team_server.url, **team_server.env()), "PATH": f"{BIN}:{os.environ['PATH']}"}
    common = [*[a for p in as_mlflow_params(small_job()) for a in ("-P", p)], "-P", "lrs=1e-3"]
    mlflow_run = [str(BIN / "mlflow"), "run", str(REPO), "-e", "compare", "--env-manager", "local"]
    mlflow_run += ["--experiment-name", "ci-study"]
    plan = subprocess.run(
        [*mlflow_run, *common, "-P", "stage=plan"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    study = json.loads(plan.stdout.split(": ", 1)[1].splitlines()[0])
    assert study["members"] == ["lr=0.001", "lr=finder"]
    for member in study["members"]:
        args = [*common, "-P", "stage=member", "-P", f"parent_run={study['parent_run']}", "-P", f"member={member}"]
        done = subprocess.run([*mlflow_run, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(team_server.with_credentials())
    parent, children = family(client, "ci-study")
    assert parent.info.run_id == study["parent_run"]
    assert sorted(c.data.tags["study_member"] for c in children) == ["lr=0.001", "lr=finder"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.data.tags["study_complete"] == "true"
    table = Path(client.download_artifacts(parent.info.run_id, "comparison.csv", str(tmp_path))).read_text()
    assert [row.split(",")[0] for row in table.splitlines()[1:]] == ["lr=0.001", "lr=finder"]
