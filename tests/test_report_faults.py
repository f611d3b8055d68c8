"""`lr-finder report` tried the ways it could break, as a process against real servers and files: each is one line
`Error: ...` naming the URI without credentials and what to do, exit 1 (2 for a usage error), no traceback, and in
bounded time."""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from service import server
from tests.helpers import AUTH_ENV, free_port, http_answering, lr_finder

ADMIN_PASSWORD = AUTH_ENV[server.AUTH_PASSWORD_ENV]
VIEWER, VIEWER_PASSWORD = "viewer", "Viewer-pass-2026!"
# MLflow's client retries twice with backoff (tracking_env.configure_client); the rest is the interpreter's start.
BOUND_S = 45


def client_env(**extra: str) -> dict[str, str]:
    """This environment without any MLflow variable (no tracking URI, no credentials), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **extra}


def failed(*args: str, env: dict[str, str] | None = None, code: int = 1) -> str:
    """`lr-finder report ARGS` as a process: it fails with `code` in bounded time; returns its one error line."""
    began = time.monotonic()
    result = lr_finder("report", *args, env=env or client_env())
    assert time.monotonic() - began < BOUND_S
    assert result.returncode == code, result.stdout + result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    if code == 2:  # click's usage lines, then the one error
        errors = [line for line in errors if not line.startswith(("Usage:", "Try "))]
    assert len(errors) == 1 and errors[0].startswith("Error: "), result.stderr
    return errors[0]


# --- no server needed -------------------------------------------------------------------------------------------


def test_an_unsupported_scheme_is_a_usage_error_listing_what_is_accepted():
    line = failed("--experiment", "x", "--tracking-uri", "ftp://me:s3cret@files.example/x", code=2)
    assert line == (
        "Error: Invalid value for '--tracking-uri': 'ftp://files.example/x':"
        " use http(s)://HOST:PORT (a tracking server), sqlite:///FILE or postgresql://USER@HOST/DB"
    )


def test_an_empty_experiment_name_is_a_usage_error():
    line = failed("--experiment", "", "--tracking-uri", "http://127.0.0.1:9", code=2)
    assert line.startswith("Error: Invalid value for '--experiment': an empty name")


@pytest.mark.parametrize(
    "status, body, content_type",
    [
        (404, b"<html>not here</html>", "text/html"),  # any web server
        (200, b"<html>a web page</html>", "text/html"),  # a page for every path
        (200, b"{}", "application/json"),  # some other JSON API
        (404, b'{"detail": "Not Found"}', "application/json"),  # another framework's error
    ],
)
def test_a_server_that_is_not_mlflow_is_named_as_such(status, body, content_type):
    with http_answering(status, body, content_type) as url:
        line = failed("--experiment", "x", "--tracking-uri", url.replace("http://", "http://me:s3cret@"))
    assert (
        line == f"Error: {url} is not an MLflow tracking server (it answers, but not as MLflow): check --tracking-uri"
    )


def test_a_server_that_keeps_failing_is_named_after_mlflows_retries():
    with http_answering(500, b"boom", "text/plain") as url:
        line = failed("--experiment", "x", "--tracking-uri", url)
    assert line == f"Error: {url} kept failing (HTTP 5xx, retried): see the tracking server's log"


def test_an_unreachable_server_is_one_line_in_bounded_time():
    url = f"http://127.0.0.1:{free_port()}"
    line = failed("--experiment", "x", env=client_env(MLFLOW_TRACKING_URI=url.replace("//", "//me:s3cret@")))
    assert line == f"Error: cannot reach {url}: is the server running, and is --tracking-uri its address?"


def test_an_unreachable_postgresql_is_one_line_in_bounded_time_without_its_password():
    port = free_port()
    line = failed("--experiment", "x", "--tracking-uri", f"postgresql://mlflow:s3cret@127.0.0.1:{port}/mlflow")
    assert line.startswith(f"Error: cannot open the database postgresql://127.0.0.1:{port}/mlflow: connection to")
    assert "s3cret" not in line


def test_a_file_that_is_not_a_database_is_one_line(tmp_path: Path):
    (tmp_path / "notes.db").write_text("not a database\n")
    line = failed("--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path}/notes.db")
    assert line == f"Error: cannot open the database sqlite:///{tmp_path}/notes.db: file is not a database"


def test_a_database_that_is_not_mlflows_is_left_as_it_was(tmp_path: Path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (text)")
    before = path.read_bytes()
    line = failed("--experiment", "x", "--tracking-uri", f"sqlite:///{path}")
    assert line == (
        f"Error: sqlite:///{path} holds no MLflow runs: give the tracking server's address or its --backend-store-uri"
    )
    assert path.read_bytes() == before  # MLflow would have added its tables


# --- a real basic-auth tracking server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthServer:
    url: str
    parent: str
    deleted_experiment_id: str

    def with_user(self, user: str, password: str) -> str:
        return self.url.replace("http://", f"http://{user}:{password}@")


@pytest.fixture(scope="module")
def auth_server(team_server) -> AuthServer:
    """The team's basic-auth server, holding a study (a parent, two child runs) and a deleted experiment; a user
    `viewer` who may not read the study."""
    admin = team_server.with_credentials()
    client = MlflowClient(admin)
    study = client.create_experiment("study")
    parent = client.create_run(study, run_name="compare").info.run_id
    for acc in (0.8, 0.9):
        child = client.create_run(study, run_name=f"acc={acc}", tags={"mlflow.parentRunId": parent})
        client.log_metric(child.info.run_id, "test_acc", acc)
        client.set_terminated(child.info.run_id, "FINISHED")
    gone = client.create_experiment("gone")
    client.delete_experiment(gone)
    users = get_app_client("basic-auth", tracking_uri=admin)
    users.create_user(VIEWER, VIEWER_PASSWORD)
    users.grant_user_permission(VIEWER, "experiment", study, "DENY")
    return AuthServer(team_server.url, parent, gone)


@pytest.mark.slow
def test_a_study_from_a_basic_auth_server_shows_no_credentials(auth_server):
    for env, uri in (
        (client_env(), auth_server.with_user("admin", ADMIN_PASSWORD)),
        (client_env(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD), auth_server.url),
    ):
        result = lr_finder("report", "--parent", auth_server.parent, "--tracking-uri", uri, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("### Study compare in experiment study: 3 runs, 2 finished with test\\_acc")
        assert result.stdout.count(f"[open]({auth_server.url}/#/experiments/") == 3
        assert ADMIN_PASSWORD not in result.stdout + result.stderr and "admin" not in result.stdout


@pytest.mark.slow
def test_wrong_credentials_are_named_without_the_password(auth_server):
    wrong = client_env(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="wrong-pass")
    line = failed("--experiment", "study", "--tracking-uri", auth_server.url, env=wrong)
    assert line == (
        f"Error: {auth_server.url} refused the credentials (HTTP 401):"
        " set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )
    in_uri = failed("--experiment", "study", "--tracking-uri", auth_server.with_user("admin", "wrong-pass"))
    assert in_uri == line
    anonymous = failed("--experiment", "study", "--tracking-uri", auth_server.url)
    assert anonymous == line


@pytest.mark.slow
def test_a_user_without_permission_is_told_to_ask_for_it(auth_server):
    viewer = client_env(MLFLOW_TRACKING_USERNAME=VIEWER, MLFLOW_TRACKING_PASSWORD=VIEWER_PASSWORD)
    line = failed("--experiment", "study", "--tracking-uri", auth_server.url, env=viewer)
    assert line == (
        f"Error: {auth_server.url} denied access (HTTP 403): ask its admin for READ permission on the experiment"
    )


@pytest.mark.slow
def test_a_deleted_experiment_on_a_server_is_one_line(auth_server):
    line = failed("--experiment", "gone", "--tracking-uri", auth_server.with_user("admin", ADMIN_PASSWORD))
    assert line == (
        f"Error: experiment 'gone' at {auth_server.url} is deleted: restore it"
        f" (mlflow experiments restore --experiment-id {auth_server.deleted_experiment_id}) or report another"
    )
