"""Attach to (or start) the run and write the run contract (params, metrics, artifacts, tags) through MLflow."""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import mlflow
import requests
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from mlproject.errors import TrackingError
from mlproject.stores import _detail, disk_full, is_outage, prepare_store
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
    from mlproject.sources import DataInput
MLFLOW_VERSION = mlflow.__version__


class Tracker:
    """One MLflow run. Every write goes through here so the run's keys stay one contract."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.pending: list[Metric] = []  # metrics the server did not take yet (an outage): sent later, in order

    @classmethod
    def open(
        cls, tracking_uri: str, run_id: str, experiment_name: str, parent_run: str = "", system_metrics: bool = False
    ) -> Tracker:
        """Attach to `run_id` (set by `mlflow run`), or start a run: a child of `parent_run` in its experiment, or
        a run of `experiment_name`."""
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        prepare_store(mlflow.get_tracking_uri())
        client = MlflowClient(mlflow.get_tracking_uri())
        if not run_id and parent_run:
            experiment_id = client.get_run(parent_run).info.experiment_id
            run_id = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent_run}).info.run_id
        if run_id:
            run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        else:
            experiment_id = _experiment_id(client, experiment_name)
            run = mlflow.start_run(experiment_id=experiment_id, log_system_metrics=system_metrics)
        return cls(client, run.info.run_id)

    def of_run(self, run_id: str) -> Tracker:
        """Another run, written through the same client (a study member writing its parent's comparison)."""
        return Tracker(self.client, run_id)

    def tags(self) -> dict[str, str]:
        return dict(self.patiently(lambda: self.client.get_run(self.run_id), "reading the run").data.tags)

    def study_members(self, parent_run: str) -> list[Any]:
        """The parent's child runs as study members: label, status, LR, final figures, per-epoch values, seconds."""
        parent = self.patiently(lambda: self.client.get_run(parent_run), "reading the study")
        found = self.patiently(
            lambda: self.client.search_runs(
                [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run}'", max_results=1000
            ),
            "reading the study",
        )
        return [self._member(run) for run in found if "study_member" in run.data.tags]

    def _member(self, run: Any) -> Any:
        from mlproject.study import Member

        params, info = run.data.params, run.info
        final = {k: float(v) for k, v in params.items() if k.startswith(("final_", "test_")) and _is_number(v)}
        history: dict[int, dict[str, float]] = {}
        for key in ("val_acc", "val_loss", *(k.removeprefix("final_") for k in final if k.startswith("final_"))):
            for m in self.client.get_metric_history(info.run_id, key):
                history.setdefault(m.step, {})[key] = m.value
        end = info.end_time or _now_ms()
        return Member(
            label=run.data.tags["study_member"], run_id=info.run_id, status=info.status,
            lr_used=float(params.get("lr_used", "nan")), lr_source=params.get("lr_source", ""), final=final,
            history=[history[step] for step in sorted(history)], seconds=(end - info.start_time) / 1000,
        )  # fmt: skip

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
        """Run a write, waiting out a server outage (up to PATIENCE_S) instead of losing what it writes; a full disk
        is no outage: it fails at once, naming the place."""
        deadline = time.monotonic() + PATIENCE_S
        while True:
            try:
                return action()
            except OUTAGE as exc:
                if disk_full(exc):
                    raise TrackingError(f"{what}: the store is full ({self._artifact_uri()}): {_detail(exc)}") from exc
                if not is_outage(exc) or time.monotonic() > deadline:
                    raise
                log.warning("tracking server unreachable while %s; retrying until it returns", what)
                time.sleep(2.0)

    def _artifact_uri(self) -> str:
        """Where this run's artifacts go, for an error that names the place; the database when that cannot be read."""
        try:
            return redact(self.client.get_run(self.run_id).info.artifact_uri)
        except Exception:  # the store that is full may be the database itself
            return redact(mlflow.get_tracking_uri())

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

    def log_metric_series(self, series: Mapping[str, Sequence[float]]) -> None:
        """Each key's values at steps 0, 1, 2, ... (a curve), batched as log_metrics batches a step's values."""
        now = _now_ms()
        self.pending.extend(
            Metric(key, float(v), now, step) for key, values in series.items() for step, v in enumerate(values)
            if math.isfinite(v)
        )  # fmt: skip
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

    def log_model(self, payload: ModelPayload, code: str = "") -> str:
        """torch.export's program where the model exports (it loads where this package and the user's code are
        absent); a pickle otherwise, with the user's code folder alongside. Returns the model's URI."""
        from mlflow.models import infer_signature

        if payload.why_no_signature:
            log.warning("logging the model without a signature: %s", payload.why_no_signature)
        signature = infer_signature(payload.example, payload.output) if payload.example is not None else None
        requirements = [f"torch=={torch_version()}"]

        def write(serialization: str) -> str:
            extra = {"code_paths": [code]} if code and serialization == "pickle" else {}
            return mlflow.pytorch.log_model(  # type: ignore[attr-defined]
                payload.model,
                name="model",
                signature=signature,
                input_example=payload.example,
                pip_requirements=requirements,
                serialization_format=serialization,
                **extra,
            ).model_uri

        if payload.example is None:  # torch.export traces the model on an example input
            return self.patiently(lambda: write("pickle"), "logging the model")
        try:
            with warnings.catch_warnings():  # torch.export's advice on how the user's module stores tensors
                warnings.simplefilter("ignore", UserWarning)
                return self.patiently(lambda: write("pt2"), "logging the model")
        except (MlflowException, TrackingError):
            raise
        except Exception as exc:  # torch.export cannot trace every user forward(): keep the model as a pickle
            log.warning("torch.export failed (%s: %s); logging the model as a pickle", type(exc).__name__, exc)
            return self.patiently(lambda: write("pickle"), "logging the model")

    def register(self, name: str, model_uri: str, tags: Mapping[str, str]) -> str:
        """The logged model as the next version of the registered model `name`, tagged; returns the version."""
        version = self.patiently(lambda: mlflow.register_model(model_uri, name), "registering the model").version
        for key, value in tags.items():
            self.patiently(lambda k=key, v=value: self.client.set_model_version_tag(name, version, k, v), "tagging")
        return str(version)

    def rename(self, name: str) -> None:
        self.set_tags({"mlflow.runName": name})

    def name(self) -> str:
        return self.tags().get("mlflow.runName", "")

    def end(self, status: str, error: str | None = None) -> None:
        """End the run with FINISHED, FAILED or KILLED; a failure's message goes to error.txt. What cannot be
        written (held-back metrics, error.txt on a full store) is said, and the status is still recorded."""
        try:
            self.flush()
            if error:
                self.log_files({"error.txt": error.rstrip() + "\n"})
        except (TrackingError, *OUTAGE) as exc:
            log.warning("the run's last writes were lost: %s", _detail(exc))
        # The status is written first, on its own: mlflow.end_run forgets the active run before it writes, so a
        # retried end_run after a failed write (sqlite busy, a server restarting) would leave the run RUNNING.
        self.patiently(lambda: self.client.set_terminated(self.run_id, status), "ending the run")
        self.patiently(lambda: mlflow.end_run(status), "ending the run")  # forgets it, stops the system metrics

    def params(self) -> dict[str, str]:
        return dict(self.patiently(lambda: self.client.get_run(self.run_id), "reading the run").data.params)

    def download(self, path: str, dst: Path) -> Path:
        """An artifact of this run, e.g. the checkpoint or config.json of a run being resumed."""
        try:
            return Path(self.client.download_artifacts(self.run_id, path, str(dst)))
        except MlflowException as exc:
            raise TrackingError(f"run {self.run_id} has no artifact {path}: {exc.message}") from exc


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, made if it does not exist. Jobs started together race to make it, and the loser reads
    the winner's: mlflow.set_experiment returns early in that case without making it the active experiment, and
    the run would start in the Default experiment instead."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as exc:
        if not _lost_insert_race(exc):
            raise
    found = client.get_experiment_by_name(name)
    if found is None:  # made and deleted again in between
        raise MlflowException(f"experiment {name!r} vanished while this job made it")
    return found.experiment_id


def _lost_insert_race(exc: MlflowException) -> bool:
    """The server's insert hit a row another request wrote first; each driver words it differently."""
    return exc.error_code == "RESOURCE_ALREADY_EXISTS" or DUPLICATE_KEY.search(exc.message) is not None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _now_ms() -> int:
    return int(time.time() * 1000)


def torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


class NullTracker:
    """The tracker of a rank other than 0: every write is dropped, so that only one process writes to the run and
    the others never contact the tracking server."""

    run_id = ""

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith(("log_", "set_")) or name in ("flush", "end"):
            return lambda *args, **kwargs: None
        raise AttributeError(f"{name}: rank 0 alone reads from the tracking server")

    def child(self, name: str) -> NullTracker:
        return self
