"""The one way a job writes its run: the `Tracker` protocol, MLflow's run behind it on rank 0 (RunTracker), and the
no-op of the other ranks (NullTracker), so that one process alone writes and the others never contact the server.

RunTracker is the run's lifecycle (attach or start, child runs, the end); the writes it passes on are
metrics.MetricBuffer's (buffered through outages) and outputs' (files, datasets, the model).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import mlflow
from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

from mlproject.errors import TrackingError
from mlproject.record import outputs
from mlproject.record.client import OUTAGE, RunClient
from mlproject.record.metrics import MetricBuffer
from mlproject.record.names import Renames
from mlproject.record.reader import RunReader
from mlproject.record.stores import detail, experiment_of, prepare_store

if TYPE_CHECKING:
    from mlproject.record.outputs import DataInput
    from mlproject.record.payload import ModelPayload

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
RUN_NAME_TAG = "mlflow.runName"


class Tracker(Protocol):
    """What a job writes to its run; every rank holds one, rank 0's alone writes."""

    @property
    def run_id(self) -> str: ...

    def log_params(self, params: Mapping[str, str]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None: ...

    def log_metric_series(self, series: Mapping[str, Sequence[float]]) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_files(self, files: Mapping[str, bytes | str], artifact_path: str | None = None) -> None: ...

    def log_json(self, name: str, payload: object, artifact_path: str | None = None) -> None: ...

    def log_dataset(self, item: DataInput) -> None: ...

    def log_model(self, payload: ModelPayload, code: str = "") -> str: ...

    def register(self, name: str, model_uri: str, tags: Mapping[str, str]) -> str: ...

    def child(self, name: str) -> Tracker: ...

    def of_run(self, run_id: str) -> Tracker: ...

    def end(self, status: str, error: str | None = None) -> None: ...


class RunTracker:
    """One MLflow run, written by rank 0."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.run = RunClient(client, run_id)
        self.renames = Renames()  # every metric and param key, as MLflow stores it
        self.metrics = MetricBuffer(self.run, self.renames)
        self.reader = RunReader(self.run)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @classmethod
    def open(
        cls, tracking_uri: str, run_id: str, experiment_name: str, parent_run: str = "", system_metrics: bool = False
    ) -> RunTracker:
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
            experiment_id = experiment_of(client, experiment_name)
            run = mlflow.start_run(experiment_id=experiment_id, log_system_metrics=system_metrics)
        return cls(client, run.info.run_id)

    def child(self, name: str) -> RunTracker:
        """A nested run under this one (a study's member); end() it before starting the next."""
        parent = self.reader.get()
        # Created explicitly: start_run() without a run id would reattach to MLFLOW_RUN_ID, the parent.
        created = self.run.client.create_run(
            parent.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.run_id}
        )
        run = mlflow.start_run(run_id=created.info.run_id, nested=True)
        return RunTracker(self.run.client, run.info.run_id)

    def of_run(self, run_id: str) -> RunTracker:
        """Another run, written through the same client (a study member writing its parent's comparison)."""
        return RunTracker(self.run.client, run_id)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Params are write-once: keys already on the run (e.g. logged by `mlflow run`) keep their spelling."""
        client = self.run.client
        stored = {self.renames(k): v for k, v in params.items()}

        def write() -> None:
            existing = client.get_run(self.run_id).data.params
            new = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in stored.items() if k not in existing]
            if new:
                client.log_batch(self.run_id, params=new, tags=[RunTag(k, v) for k, v in self.renames.tag().items()])

        self.run.patiently(write, "logging params")

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Sent at once, or held through an outage and sent with the next call: training never waits."""
        self.metrics.log(metrics, step)

    def log_metric_series(self, series: Mapping[str, Sequence[float]]) -> None:
        self.metrics.log_series(series)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        rows = [RunTag(k, str(v)) for k, v in tags.items()]
        self.run.patiently(lambda: self.run.client.log_batch(self.run_id, tags=rows), "setting tags")

    def log_files(self, files: Mapping[str, bytes | str], artifact_path: str | None = None) -> None:
        outputs.log_files(self.run, files, artifact_path)

    def log_json(self, name: str, payload: object, artifact_path: str | None = None) -> None:
        outputs.log_files(self.run, {name: outputs.as_json(payload)}, artifact_path)

    def log_dataset(self, item: DataInput) -> None:
        outputs.log_dataset(self.run, item)

    def log_model(self, payload: ModelPayload, code: str = "") -> str:
        return outputs.log_model(self.run, payload, code)

    def register(self, name: str, model_uri: str, tags: Mapping[str, str]) -> str:
        return outputs.register(self.run, name, model_uri, tags)

    def end(self, status: str, error: str | None = None) -> None:
        """End the run with FINISHED, FAILED or KILLED; a failure's message goes to error.txt. What cannot be
        written (held-back metrics, error.txt on a full store) is said, and the status is still recorded."""
        try:
            self.metrics.flush()
            if error:
                self.log_files({"error.txt": error.rstrip() + "\n"})
        except (TrackingError, *OUTAGE) as exc:
            log.warning("the run's last writes were lost: %s", detail(exc))
        # The status is written first, on its own: mlflow.end_run forgets the active run before it writes, so a
        # retried end_run after a failed write (sqlite busy, a server restarting) would leave the run RUNNING.
        self.run.patiently(lambda: self.run.client.set_terminated(self.run_id, status), "ending the run")
        self.run.patiently(lambda: mlflow.end_run(status), "ending the run")  # forgets it, stops the system metrics


class NullTracker:
    """The tracker of a rank other than 0: every write is dropped, so that only one process writes to the run and
    the others never contact the tracking server."""

    @property
    def run_id(self) -> str:
        return ""

    def log_params(self, params: Mapping[str, str]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        pass

    def log_metric_series(self, series: Mapping[str, Sequence[float]]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_files(self, files: Mapping[str, bytes | str], artifact_path: str | None = None) -> None:
        pass

    def log_json(self, name: str, payload: object, artifact_path: str | None = None) -> None:
        pass

    def log_dataset(self, item: DataInput) -> None:
        pass

    def log_model(self, payload: ModelPayload, code: str = "") -> str:
        return ""

    def register(self, name: str, model_uri: str, tags: Mapping[str, str]) -> str:
        return ""

    def child(self, name: str) -> NullTracker:
        return self

    def of_run(self, run_id: str) -> NullTracker:
        return self

    def end(self, status: str, error: str | None = None) -> None:
        pass
