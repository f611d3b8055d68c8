"""Talking to a tracking server from the job or the host, without importing mlflow: the client's settings,
credentials kept out of every URI shown, and links to a run in the UI."""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from urllib.parse import urlsplit, urlunsplit

# MLflow retries a failed request 7 times with backoff (minutes); the job buffers metrics itself instead, and a
# cancelled CI job has seconds left.
CLIENT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# MLflow prints "View run ... at <tracking URI>" links, and the URI may hold a password.
QUIET = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_USERINFO = re.compile(r"(?<=//)(?:([^/@:\s]*):)?[^/\s]*@")  # to the last @: a password may hold one


def configure_client(environ: MutableMapping[str, str] = os.environ) -> None:
    """Bounded retries and no printed links, unless the caller's environment chose otherwise."""
    for key, value in {**CLIENT_RETRIES, **QUIET}.items():
        environ.setdefault(key, value)


def redact(text: str) -> str:
    """Every URL in `text` with the secret of its user information masked: user:***@ for a password, ***@ for
    a bare token."""
    return _USERINFO.sub(lambda m: f"{m.group(1)}:***@" if m.group(1) is not None else "***@", text)


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI at ui_url, credentials dropped; '' without a UI address."""
    if not ui_url:
        return ""
    parts = urlsplit(ui_url)
    base = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def pin_local_store(environ: MutableMapping[str, str], cwd: str) -> None:
    """A local sqlite store named relative to `cwd` (or MLflow's default, ./mlflow.db), made absolute: the job may
    change its working folder (to the user's code) and must keep writing where it was told."""
    uri = environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        environ["MLFLOW_TRACKING_URI"] = "sqlite:///" + os.path.join(cwd, uri.removeprefix("sqlite:///"))
