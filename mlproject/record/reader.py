"""Runs read back from the tracking store, by rank 0 alone: a run's params and tags, a parent's child runs, a metric's
history, an artifact downloaded. Plain records out, so that the callers need no MLflow types."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from mlproject.errors import TrackingError
from mlproject.record.client import RunClient

MAX_CHILDREN = 1000


@dataclass(frozen=True)
class RunView:
    """A run as the store holds it."""

    run_id: str
    experiment_id: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    started_ms: int
    ended_ms: int | None  # None while it runs

    @property
    def seconds(self) -> float:
        """Its wall time so far (to now, while it runs)."""
        end = self.ended_ms if self.ended_ms else int(time.time() * 1000)
        return (end - self.started_ms) / 1000


def _view(run: Run) -> RunView:
    info, data = run.info, run.data
    params, tags = dict(data.params), dict(data.tags)
    return RunView(info.run_id, info.experiment_id, info.status, params, tags, info.start_time, info.end_time)


class RunReader:
    """Reads through a run's client, waiting out outages as its writes do."""

    def __init__(self, run: RunClient) -> None:
        self.run = run

    def get(self, run_id: str = "") -> RunView:
        """A run (by default the client's own)."""
        wanted = run_id or self.run.run_id
        return _view(self.run.patiently(lambda: self.run.client.get_run(wanted), "reading the run"))

    def children(self, parent_run: str) -> list[RunView]:
        """The child runs of `parent_run`, in its experiment."""
        experiment_id = self.get(parent_run).experiment_id
        found = self.run.patiently(
            lambda: self.run.client.search_runs(
                [experiment_id],
                f"tags.mlflow.parentRunId = '{parent_run}'",
                max_results=MAX_CHILDREN,
            ),
            "reading the child runs",
        )
        return [_view(run) for run in found]

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """A metric's (step, value) rows, in the order they were logged."""
        rows = self.run.patiently(lambda: self.run.client.get_metric_history(run_id, key), "reading a metric")
        return [(m.step, m.value) for m in rows]

    def download(self, path: str, dst: Path) -> Path:
        """An artifact of the client's run, e.g. the checkpoint or config.json of a run being resumed."""
        try:
            return Path(self.run.client.download_artifacts(self.run.run_id, path, str(dst)))
        except MlflowException as exc:
            raise TrackingError(f"run {self.run.run_id} has no artifact {path}: {exc.message}") from exc
