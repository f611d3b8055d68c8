"""The tracking store seen from outside a run: the URI checked before a job starts (scheme, server, credentials,
experiment, a local store made private), errors that are no outage, and runs read, created or ended from another
process than theirs."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import DatabaseError

from mlproject.errors import TrackingError
from mlproject.record.environment import redact

log = logging.getLogger(__name__)

# A unique-key violation as the server words it: "(psycopg2.errors.UniqueViolation) duplicate key value ..." on
# PostgreSQL, "(sqlite3.IntegrityError) UNIQUE constraint failed ..." on sqlite
DUPLICATE_KEY = re.compile(r"IntegrityError|UniqueViolation")


def probe(tracking_uri: str, timeout_s: float = 20.0) -> None:
    """Fail fast, in one line naming the URI (credentials hidden), when the tracking URI cannot work: a scheme
    MLflow has no store for, an HTTP server that does not answer (MLflow's retries take minutes), that is not an
    MLflow server, or that refuses the credentials."""
    if not tracking_uri.startswith(("http://", "https://")):
        _check_scheme(tracking_uri)
        return
    base = tracking_uri.rstrip("/")
    deadline = time.monotonic() + timeout_s
    reason = ""
    while time.monotonic() < deadline:
        try:
            answer = requests.get(base + "/health", timeout=5)
            if answer.status_code < 500:
                return _check_server(base)
            reason = f"HTTP {answer.status_code}"
        except requests.RequestException as exc:
            reason = type(exc).__name__
        time.sleep(1.0)
    raise TrackingError(
        f"tracking server {redact(tracking_uri)} unreachable for {timeout_s:.0f} s ({reason}); "
        "check MLFLOW_TRACKING_URI and that the server is up"
    )


def _check_scheme(uri: str) -> None:
    prepare_store(uri or mlflow.get_tracking_uri())  # a local store that cannot be made: said in one line
    try:
        MlflowClient(uri or None)
    except MlflowException as exc:  # its message repeats the URI, password and all: not passed on
        scheme = uri.split(":", 1)[0]
        raise TrackingError(
            f"tracking URI {redact(uri)}: MLflow has no store for {scheme}://; use http(s)://, sqlite:/// or "
            "postgresql://"
        ) from exc


def _check_server(base: str) -> None:
    """One read as the job will make it: an MLflow server answers JSON, and takes the credentials it is given."""
    user, password, token = (os.environ.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD", "TOKEN"))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    auth = (user, password or "") if user and not token else None
    url = base + "/api/2.0/mlflow/experiments/search"
    try:
        answer = requests.get(url, params={"max_results": 1}, auth=auth, headers=headers, timeout=10)
    except requests.RequestException as exc:
        raise TrackingError(f"tracking server {redact(base)} failed to answer {type(exc).__name__}") from exc
    if answer.status_code in (401, 403):
        raise TrackingError(
            f"tracking server {redact(base)} refused the credentials (HTTP {answer.status_code}): set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"
        )
    try:
        found = answer.json()
    except ValueError:
        found = None
    if not isinstance(found, dict) or answer.status_code >= 400:
        raise TrackingError(
            f"{redact(base)} is not an MLflow tracking server (its experiments API answered HTTP {answer.status_code}"
            f"{'' if isinstance(found, dict) else ', not JSON'}); check MLFLOW_TRACKING_URI"
        )


def check_experiment(tracking_uri: str, name: str) -> None:
    """The experiment a new run goes to can take it: a name, of no deleted experiment."""
    if not name.strip():
        raise TrackingError("the experiment name is empty: pass --experiment-name NAME or set MLFLOW_EXPERIMENT_NAME")
    prepare_store(tracking_uri or mlflow.get_tracking_uri())
    found = MlflowClient(tracking_uri or None).get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name!r} is deleted: restore it (mlflow experiments restore --experiment-id "
            f"{found.experiment_id}) or name another"
        )


def prepare_store(uri: str) -> None:
    """A local sqlite store: created readable by this user alone, and its tables made by one job at a time, so that
    jobs started together on a new store do not race in MLflow's schema migration."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as exc:
        raise TrackingError(
            f"cannot create the tracking store {path}: {exc.strerror}; set MLFLOW_TRACKING_URI to a writable place"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # not SQLite's own locks (fcntl ranges): a lock between jobs only
        MlflowClient(uri).search_experiments(max_results=1)  # makes or migrates the tables
    except DatabaseError as exc:  # a file that is not a database: sqlite's word for it, not 110 lines of traceback
        raise TrackingError(
            f"tracking store {path} is not an MLflow sqlite database ({exc.orig or exc}); name a new file or an "
            "MLflow store in MLFLOW_TRACKING_URI"
        ) from exc
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def disk_full(exc: BaseException) -> bool:
    """No space (or quota) left where the store writes, locally or behind the server (its 500 says so)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = exc.message if isinstance(exc, MlflowException) else str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


def detail(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    text = exc.message if isinstance(exc, MlflowException) else str(exc)
    return redact(text.strip().splitlines()[0][:300]) if text.strip() else type(exc).__name__


def is_outage(exc: BaseException) -> bool:
    """A connection failure or a 5xx: the server is away, not refusing the write (which retrying cannot fix)."""
    if isinstance(exc, (requests.RequestException, ConnectionError)):
        return True
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500 or "Max retries exceeded" in exc.message
    return False


def refusal(exc: BaseException) -> bool:
    """The store's answer that it will not take a write (a bad name or value, a param written before, no
    permission): no outage, and not a full store; sending it again cannot help."""
    return isinstance(exc, MlflowException) and not is_outage(exc) and not disk_full(exc)


def fail_run(tracking_uri: str, run_id: str, error: str) -> None:
    """Mark an existing run FAILED with error.txt, from outside the process that ran it: an error found before the
    job could attach, or a run whose processes died before they could record how it ended."""
    client = MlflowClient(tracking_uri or None)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "error.txt").write_text(error.rstrip() + "\n")
        try:
            client.log_artifacts(run_id, tmp)
        except (MlflowException, OSError) as exc:  # a full store still gets the status
            log.warning("error.txt not written: %s", detail(exc))
    client.set_terminated(run_id, "FAILED")


def read_json(tracking_uri: str, run_id: str, path: str) -> dict[str, Any] | None:
    """A JSON artifact of a run (a study's plan), or None when the run or the file is not there."""
    client = MlflowClient(tracking_uri or None)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())
        except (MlflowException, OSError, json.JSONDecodeError):
            return None


def run_status(tracking_uri: str, run_id: str) -> str:
    return MlflowClient(tracking_uri or None).get_run(run_id).info.status


def run_is_active(tracking_uri: str, run_id: str) -> bool:
    """Whether the run is still RUNNING, i.e. nobody has recorded how it ended."""
    return MlflowClient(tracking_uri or None).get_run(run_id).info.status == "RUNNING"


def create_run(tracking_uri: str, experiment_name: str) -> str:
    """A new run in the experiment (created if missing), for processes that attach to it by id."""
    client = MlflowClient(tracking_uri or None)
    return str(client.create_run(experiment_of(client, experiment_name)).info.run_id)


def experiment_of(client: MlflowClient, name: str) -> str:
    """The experiment's id, made if it does not exist. Jobs started together race to make it, and the loser reads
    the winner's: mlflow.set_experiment returns early in that case without making it the active experiment, and
    the run would start in the Default experiment instead."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException as exc:
        if not lost_insert_race(exc):
            raise
    found = client.get_experiment_by_name(name)
    if found is None:  # made and deleted again in between
        raise MlflowException(f"experiment {name!r} vanished while this job made it")
    return str(found.experiment_id)


def lost_insert_race(exc: MlflowException) -> bool:
    """The server's insert hit a row another request wrote first; each driver words it differently."""
    return exc.error_code == "RESOURCE_ALREADY_EXISTS" or DUPLICATE_KEY.search(exc.message) is not None
