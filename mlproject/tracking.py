"""Attach to (or start) the run and write the run contract (params, metrics, artifacts, tags) through MLflow."""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import mlflow
import requests
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from mlproject.errors import TrackingError
from mlproject.tracking_env import redact

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
OUTAGE = (MlflowException, requests.RequestException, OSError)  # what a down or restarting server raises
PATIENCE_S = 300.0  # how long a write waits for the tracking server to come back
# A unique-key violation as the server words it: "(psycopg2.errors.UniqueViolation) duplicate key value ..." on
# PostgreSQL, "(sqlite3.IntegrityError) UNIQUE constraint failed ..." on sqlite
DUPLICATE_KEY = re.compile(r"IntegrityError|UniqueViolation")
T = TypeVar("T")

if TYPE_CHECKING:
    from mlproject.artifacts import ModelPayload
    from mlproject.task import DataInput
MLFLOW_VERSION = mlflow.__version__


class Tracker:
    """One MLflow run. Every write goes through here so the run's keys stay one contract."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.pending: list[Metric] = []  # metrics the server did not take yet (an outage): sent later, in order

    @classmethod
    def open(cls, tracking_uri: str, run_id: str, experiment_name: str) -> Tracker:
        """Attach to `run_id` (set by `mlflow run`) or start a run in `experiment_name`."""
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if run_id:
            run = mlflow.start_run(run_id=run_id)
        else:
            mlflow.set_experiment(experiment_name)
            run = mlflow.start_run()
        return cls(MlflowClient(mlflow.get_tracking_uri()), run.info.run_id)

    def child(self, name: str) -> Tracker:
        """A nested run under this one (a study's member); end() it before starting the next."""
        parent = self.client.get_run(self.run_id)
        # Created explicitly: start_run() without a run id would reattach to MLFLOW_RUN_ID, the parent.
        created = self.client.create_run(
            parent.info.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.run_id}
        )
        run = mlflow.start_run(run_id=created.info.run_id, nested=True)
        return Tracker(self.client, run.info.run_id)

    def patiently(self, action: Callable[[], T], what: str) -> T:
        """Run a write, waiting out a server outage (up to PATIENCE_S) instead of losing what it writes."""
        deadline = time.monotonic() + PATIENCE_S
        while True:
            try:
                return action()
            except OUTAGE as exc:
                if not is_outage(exc) or time.monotonic() > deadline:
                    raise
                log.warning("tracking server unreachable while %s; retrying until it returns", what)
                time.sleep(2.0)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Params are write-once: keys already on the run (e.g. logged by `mlflow run`) keep their spelling."""

        def write() -> None:
            existing = self.client.get_run(self.run_id).data.params
            new = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items() if k not in existing]
            if new:
                self.client.log_batch(self.run_id, params=new)

        self.patiently(write, "logging params")

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """One batched request; non-finite values are dropped (MLflow would store NaN and plot garbage).

        If the server is down, the rows wait in `pending` and training carries on; the next call or flush()
        sends them.
        """
        now = _now_ms()
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        skipped = sorted(set(metrics) - {m.key for m in rows})
        if skipped:
            log.warning("not logging non-finite metrics %s at step %d", skipped, step)
        self.pending.extend(rows)
        try:
            self._send_pending()
        except OUTAGE as exc:
            log.warning("tracking server unreachable, %d metric values kept for later: %s", len(self.pending), exc)

    def _send_pending(self) -> None:
        while self.pending:
            batch = self.pending[:1000]  # MLflow's limit per log_batch
            self.client.log_batch(self.run_id, metrics=batch)
            del self.pending[: len(batch)]

    def flush(self) -> None:
        """Send what an outage held back, waiting for the server; TrackingError if it stays away."""
        try:
            self.patiently(self._send_pending, "sending held-back metrics")
        except OUTAGE as exc:
            raise TrackingError(f"{len(self.pending)} metric values not logged: {exc}") from exc

    def set_tags(self, tags: Mapping[str, str]) -> None:
        rows = [RunTag(k, str(v)) for k, v in tags.items()]
        self.patiently(lambda: self.client.log_batch(self.run_id, tags=rows), "setting tags")

    def log_files(self, files: Mapping[str, bytes | str], artifact_path: str | None = None) -> None:
        """Write named contents to a temporary folder and log them together."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                target = Path(tmp) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    target.write_bytes(content)
                else:
                    target.write_text(content)
            self.patiently(lambda: self.client.log_artifacts(self.run_id, tmp, artifact_path), "logging artifacts")

    def log_json(self, name: str, payload: object, artifact_path: str | None = None) -> None:
        self.log_files({name: json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"}, artifact_path)

    def log_dataset(self, item: DataInput) -> None:
        """A run input with its context tag, as mlflow.log_input writes it: arrays with their digest, or a folder's
        source alone."""
        with warnings.catch_warnings():  # a local path matches two equivalent source types; either is right
            warnings.simplefilter("ignore", UserWarning)
            if item.arrays is not None:
                images, labels = item.arrays
                dataset = mlflow.data.from_numpy(images, targets=labels, source=item.source, name=item.name)
            else:
                try:
                    source = resolve_dataset_source(item.source)
                except MlflowException:  # a data module's own notion of a source: nothing MLflow can point at
                    log.info("dataset %s: %s is no source MLflow knows; not logged as a run input", item.name,
                             item.source)  # fmt: skip
                    return
                dataset = MetaDataset(source, name=item.name)
        link = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, item.context)])
        for attempt in range(3):
            try:
                self.patiently(lambda: self.client.log_inputs(self.run_id, datasets=[link]), "logging the dataset")
                return
            except MlflowException as exc:
                # Jobs logging the same dataset at once race on the server's insert (a unique violation on
                # PostgreSQL); the loser's retry finds the winner's row and links to it.
                if attempt == 2 or not _lost_insert_race(exc):
                    raise
                time.sleep(0.5)

    def log_model(self, payload: ModelPayload, code: str = "") -> None:
        """torch.export's program where the model exports (it loads where this package and the user's code are
        absent); a pickle otherwise, with the user's code folder alongside."""
        from mlflow.models import infer_signature

        if payload.why_no_signature:
            log.warning("logging the model without a signature: %s", payload.why_no_signature)
        signature = infer_signature(payload.example, payload.output) if payload.example is not None else None
        requirements = [f"torch=={torch_version()}"]

        def write(serialization: str) -> None:
            extra = {"code_paths": [code]} if code and serialization == "pickle" else {}
            mlflow.pytorch.log_model(  # type: ignore[attr-defined]
                payload.model,
                name="model",
                signature=signature,
                input_example=payload.example,
                pip_requirements=requirements,
                serialization_format=serialization,
                **extra,
            )

        if payload.example is None:  # torch.export traces the model on an example input
            self.patiently(lambda: write("pickle"), "logging the model")
            return
        try:
            with warnings.catch_warnings():  # torch.export's advice on how the user's module stores tensors
                warnings.simplefilter("ignore", UserWarning)
                self.patiently(lambda: write("pt2"), "logging the model")
        except MlflowException:
            raise
        except Exception as exc:  # torch.export cannot trace every user forward(): keep the model as a pickle
            log.warning("torch.export failed (%s: %s); logging the model as a pickle", type(exc).__name__, exc)
            self.patiently(lambda: write("pickle"), "logging the model")

    def end(self, status: str, error: str | None = None) -> None:
        """End the run with FINISHED, FAILED or KILLED; a failure's message goes to error.txt."""
        try:
            self.flush()
            if error:
                self.log_files({"error.txt": error.rstrip() + "\n"})
        finally:
            self.patiently(lambda: mlflow.end_run(status), "ending the run")

    def download(self, path: str, dst: Path) -> Path:
        """An artifact of this run, e.g. the checkpoint or config.json of a run being resumed."""
        try:
            return Path(self.client.download_artifacts(self.run_id, path, str(dst)))
        except MlflowException as exc:
            raise TrackingError(f"run {self.run_id} has no artifact {path}: {exc.message}") from exc


def probe(tracking_uri: str, timeout_s: float = 20.0) -> None:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer (MLflow's retries take minutes)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + timeout_s
    reason = ""
    while time.monotonic() < deadline:
        try:
            answer = requests.get(tracking_uri.rstrip("/") + "/health", timeout=5)
            if answer.status_code < 500:
                return
            reason = f"HTTP {answer.status_code}"
        except requests.RequestException as exc:
            reason = type(exc).__name__
        time.sleep(1.0)
    raise TrackingError(
        f"tracking server {redact(tracking_uri)} unreachable for {timeout_s:.0f} s ({reason}); "
        "check MLFLOW_TRACKING_URI and that the server is up"
    )


def is_outage(exc: BaseException) -> bool:
    """A connection failure or a 5xx: the server is away, not refusing the write (which retrying cannot fix)."""
    if isinstance(exc, (requests.RequestException, ConnectionError)):
        return True
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500 or "Max retries exceeded" in exc.message
    return False


def _lost_insert_race(exc: MlflowException) -> bool:
    """The server's insert hit a row another request wrote first; each driver words it differently."""
    return exc.error_code == "RESOURCE_ALREADY_EXISTS" or DUPLICATE_KEY.search(exc.message) is not None


def fail_run(tracking_uri: str, run_id: str, error: str) -> None:
    """Mark an existing run FAILED with error.txt: for errors found before the job could attach to it."""
    client = MlflowClient(tracking_uri or None)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "error.txt").write_text(error.rstrip() + "\n")
        client.log_artifacts(run_id, tmp)
    client.set_terminated(run_id, "FAILED")


def _now_ms() -> int:
    return int(time.time() * 1000)


def run_is_active(tracking_uri: str, run_id: str) -> bool:
    """Whether the run is still RUNNING, i.e. nobody has recorded how it ended."""
    return MlflowClient(tracking_uri or None).get_run(run_id).info.status == "RUNNING"


def torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]
