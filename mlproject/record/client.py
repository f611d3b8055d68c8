"""One run's MLflow client: every call waits out an outage of the tracking server (up to PATIENCE_S), and a full store
is no outage: it fails at once, naming the place."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import mlflow
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlproject.errors import TrackingError
from mlproject.record.environment import redact
from mlproject.record.stores import detail, disk_full, is_outage

log = logging.getLogger(__name__)

OUTAGE = (MlflowException, requests.RequestException, OSError)  # what a down or restarting server raises
PATIENCE_S = 300.0  # how long a write waits for the tracking server to come back
RETRY_S = 2.0
T = TypeVar("T")


class RunClient:
    """The client and the id of one run, with the patience every write of it needs."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def patiently(self, action: Callable[[], T], what: str) -> T:
        """Run a call, waiting out a server outage instead of losing what it writes; TrackingError on a full store."""
        deadline = time.monotonic() + PATIENCE_S
        while True:
            try:
                return action()
            except OUTAGE as exc:
                if disk_full(exc):
                    raise TrackingError(f"{what}: the store is full ({self.artifact_uri()}): {detail(exc)}") from exc
                if not is_outage(exc) or time.monotonic() > deadline:
                    raise
                log.warning("tracking server unreachable while %s; retrying until it returns", what)
                time.sleep(RETRY_S)

    def artifact_uri(self) -> str:
        """Where this run's artifacts go, for an error that names the place; the database when that cannot be read."""
        try:
            return redact(self.client.get_run(self.run_id).info.artifact_uri)
        except Exception:  # the store that is full may be the database itself
            return redact(mlflow.get_tracking_uri())

    def of_run(self, run_id: str) -> RunClient:
        """Another run, through the same client."""
        return RunClient(self.client, run_id)
