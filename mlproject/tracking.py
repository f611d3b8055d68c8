"""The only mlflow import: attach to (or start) the run; write the run contract (params, metrics, artifacts, tags)."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


class Tracker:
    """One MLflow run. Every write goes through here so the run's keys stay one contract."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

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

    @property
    def url_path(self) -> str:
        run = self.client.get_run(self.run_id)
        return f"#/experiments/{run.info.experiment_id}/runs/{self.run_id}"

    def log_params(self, params: Mapping[str, str]) -> None:
        """Params are write-once: keys already on the run (e.g. logged by `mlflow run`) keep their spelling."""
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items() if k not in existing]
        if new:
            self.client.log_batch(self.run_id, params=new)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """One batched request; non-finite values are dropped (MLflow would store NaN and plot garbage)."""
        now = _now_ms()
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        skipped = sorted(set(metrics) - {m.key for m in rows})
        if skipped:
            log.warning("not logging non-finite metrics %s at step %d", skipped, step)
        if rows:
            self.client.log_batch(self.run_id, metrics=rows)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

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
            self.client.log_artifacts(self.run_id, tmp, artifact_path)

    def log_json(self, name: str, payload: object, artifact_path: str | None = None) -> None:
        self.log_files({name: json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"}, artifact_path)

    def log_dataset(self, name: str, images: np.ndarray, labels: np.ndarray, source: str, context: str) -> None:
        with warnings.catch_warnings():  # a local path matches two equivalent source types; either is right
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_numpy(images, targets=labels, source=source, name=name)
        mlflow.log_input(dataset, context=context)

    def log_model(self, model: object, example: np.ndarray, output: np.ndarray, requirements: list[str]) -> None:
        from mlflow.models import infer_signature

        signature = infer_signature(example, output)
        mlflow.pytorch.log_model(  # type: ignore[attr-defined]
            model, name="model", signature=signature, input_example=example, pip_requirements=requirements
        )

    def end(self, status: str, error: str | None = None) -> None:
        """End the run with FINISHED, FAILED or KILLED; a failure's message goes to error.txt."""
        try:
            if error:
                self.log_files({"error.txt": error.rstrip() + "\n"})
        finally:
            mlflow.end_run(status)


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
