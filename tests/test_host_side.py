"""The host install (`pip install -c constraints.txt .`, what the GPU pipelines install: no torch, no Flask, no
SQLAlchemy) answers every host command in one line: server and report name the extra they lack, and deploy fills
in the templates of the checkout it runs in."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from service.deploy_cli import default_project
from tests.helpers import REPO, free_port, host_install


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return host_install(tmp_path_factory.mktemp("host"))


def lr_finder(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The host install's `lr-finder ARGS`, without any MLflow variable of this environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    cmd = [str(bin_dir / "lr-finder"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def test_deploy_reads_the_templates_of_an_editable_checkout_else_of_the_current_folder(tmp_path):
    assert default_project(REPO, tmp_path) == REPO
    assert default_project(tmp_path / "site-packages", REPO) == REPO


@pytest.mark.slow
def test_server_names_the_extra_it_needs_in_one_line(host, tmp_path):
    result = lr_finder(host, "server", "--port", str(free_port()), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Error: lr-finder server needs mlflow, not installed here: pip install 'lr-finder[server]'"
    ]
    assert not list(tmp_path.iterdir()), "nothing started, nothing written"


@pytest.mark.slow
def test_report_reads_a_tracking_server_and_names_the_extra_a_database_needs(host, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = lr_finder(host, "report", "--experiment", "x", "--tracking-uri", url, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"Error: cannot reach {url}: is the server running, and is --tracking-uri its address?"
    ]
    database = f"sqlite:///{tmp_path}/mlflow.db"
    result = lr_finder(host, "report", "--experiment", "x", "--tracking-uri", database, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"Error: reading the database {database} needs SQLAlchemy; the host install reads tracking servers only:"
        " pip install 'lr-finder[server]'"
    ]


@pytest.mark.slow
def test_deploy_fills_in_the_templates_of_the_checkout_it_runs_in(host):
    result = lr_finder(host, "deploy", "slurm", "--image", "/shared/lr-finder.sqsh", "--nodes", "2", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --nodes=2" in result.stdout.splitlines()
