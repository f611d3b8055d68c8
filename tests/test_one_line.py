"""What the README promises for the job's failures around it: one line naming the cause and what to do, a non-zero
exit, no traceback; each with a real process, store, server or file system."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import (
    as_options,
    finish,
    http_answering,
    job_env,
    requires_fashion_mnist,
    small_job,
    start_job,
)

SMALL = as_options(small_job(epochs=1))


def one_line(code: int, err: str, expected_code: int = 1) -> str:
    lines = err.strip().splitlines()
    assert code == expected_code and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def run(tmp: Path, *args: str, uri: str, timeout: float = 180, **env: str) -> tuple[int, str, str]:
    return finish(start_job(tmp, "train", *args, env=job_env(uri, **env)), timeout)


def test_a_tracking_uri_of_a_scheme_mlflow_has_no_store_for(tmp_path):
    code, _, err = run(tmp_path, *SMALL, uri="ftp://user:secret@files.example/mlflow")
    line = one_line(code, err)
    assert "ftp://" in line and "secret" not in line


def test_a_sqlite_uri_naming_a_file_that_is_no_database_leaves_it_as_it_was(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    code, _, err = run(tmp_path, *SMALL, uri=f"sqlite:///{notes}")
    line = one_line(code, err)
    assert f"tracking store {notes} is not an MLflow sqlite database (file is not a database)" in line
    assert notes.read_text() == "not a database\n"


def test_a_server_that_is_not_mlflow(tmp_path):
    with http_answering(200, b"<html>hello</html>") as url:
        code, _, err = run(tmp_path, *SMALL, uri=url)
    line = one_line(code, err)
    assert "is not an MLflow tracking server" in line


@pytest.mark.slow
def test_wrong_server_credentials(tmp_path, team_server):
    wrong = {**team_server.env(), "MLFLOW_TRACKING_PASSWORD": "wrong-one"}
    code, _, err = run(tmp_path, *SMALL, uri=team_server.url, **wrong)
    line = one_line(code, err)
    assert "refused the credentials (HTTP 401)" in line and "wrong-one" not in err


@requires_fashion_mnist
def test_a_deleted_experiment_and_an_empty_experiment_name(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone", artifact_location=str(tmp_path / "a")))
    code, _, err = finish(start_job(tmp_path, "train", *SMALL, env=job_env(uri), experiment="gone"), 180)
    assert "experiment 'gone' is deleted" in one_line(code, err)
    code, _, err = finish(start_job(tmp_path, "train", *SMALL, env=job_env(uri), experiment=""), 180)
    assert "the experiment name is empty" in one_line(code, err)


def test_an_unknown_resume_id(tmp_path):
    code, _, err = run(tmp_path, "--resume", "0123456789abcdef", uri=f"sqlite:///{tmp_path}/m.db")
    line = one_line(code, err, 2)
    assert line.startswith("error: invalid value for resume: '0123456789abcdef'")


def test_a_bad_parameter_while_a_stale_mlflow_run_id_is_set(tmp_path):
    code, _, err = run(tmp_path, "--lr", "abc", uri=f"sqlite:///{tmp_path}/m.db", MLFLOW_RUN_ID="f" * 32)
    assert one_line(code, err, 2).startswith("error: invalid value for lr")


def test_a_read_only_working_directory_with_the_default_store(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere: a read-only bind mount it cannot
        folder = tmp_path / "ro"
        folder.mkdir()
        subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=False)
    else:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o555)
    try:
        env = {k: v for k, v in job_env("").items() if k != "MLFLOW_TRACKING_URI"}
        code, _, err = finish(start_job(folder, "train", *SMALL, env=env), 180)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(folder)], check=False)
    line = one_line(code, err)
    assert "cannot create the tracking store" in line and "MLFLOW_TRACKING_URI" in line


WITHOUT_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                    "--bounding-set=-dac_override,-dac_read_search", "--"]  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv(1)")
@pytest.mark.parametrize("dataset", ["fashion-mnist", "imagefolder"])
def test_an_unreadable_data_dir(tmp_path, dataset):
    """Root reads anything: the job runs without the capability that lets it, as any other user would."""
    data = tmp_path / "data"
    (data / "train" / "a").mkdir(parents=True)
    data.chmod(0o000)
    cmd = [*WITHOUT_OVERRIDE, sys.executable, "-m", "mlproject", "train", "--data-dir", str(data), "--dataset", dataset]
    uri = f"sqlite:///{tmp_path}/m.db"
    done = subprocess.run([*cmd, *SMALL], cwd=tmp_path, env=job_env(uri), capture_output=True, text=True, timeout=180)
    data.chmod(0o755)
    line = one_line(done.returncode, done.stderr, 2)
    assert str(data) in line
