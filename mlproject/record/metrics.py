"""A run's metrics, batched and held back through an outage: training never waits for the tracking server. A value
the store refuses (an answer, not an outage) costs its own key alone: said once, and the rest is kept."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence

from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from mlproject.errors import TrackingError
from mlproject.record.client import OUTAGE, RunClient
from mlproject.record.names import Renames
from mlproject.record.stores import detail, refusal

log = logging.getLogger(__name__)

BATCH = 1000  # MLflow's limit of metrics per log_batch


class MetricBuffer:
    """Metric rows in the order they were logged, under the names MLflow stores (`renames`); what the server did
    not take yet waits in `pending` and goes out with the next call, or with flush(). The `renamed` tag goes out
    with them."""

    def __init__(self, run: RunClient, renames: Renames) -> None:
        self.run, self.renames = run, renames
        self.pending: list[Metric] = []
        self.tags: dict[str, str] = {}
        self.refused: set[str] = set()  # keys the store refused: said once, dropped from then on

    def log(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """One step's values; non-finite ones are dropped (MLflow would store NaN and plot garbage)."""
        now = _now_ms()
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        skipped = sorted(set(metrics) - set(finite))
        if skipped:
            log.warning("not logging non-finite metrics %s at step %d", skipped, step)
        self._send(Metric(self._key(k), v, now, step) for k, v in finite.items())

    def log_series(self, series: Mapping[str, Sequence[float]]) -> None:
        """Each key's values at steps 0, 1, 2, ... (a curve), non-finite values left out."""
        now = _now_ms()
        self._send(
            Metric(self._key(key), float(v), now, step)
            for key, values in series.items()
            for step, v in enumerate(values)
            if math.isfinite(v)
        )

    def _key(self, name: str) -> str:
        renamed = len(self.renames.done)
        stored = self.renames(name)
        if len(self.renames.done) != renamed:
            self.tags.update(self.renames.tag())
        return stored

    def _send(self, rows: Iterable[Metric]) -> None:
        self.pending.extend(row for row in rows if row.key not in self.refused)
        try:
            self._send_pending()
        except OUTAGE as exc:
            log.warning("tracking server unreachable, %d metric values kept for later: %s", len(self.pending), exc)

    def _send_pending(self) -> None:
        while self.pending or self.tags:
            batch = self.pending[:BATCH]
            try:
                self.run.client.log_batch(self.run.run_id, metrics=batch, tags=_tags(self.tags))
            except MlflowException as exc:
                if not refusal(exc):
                    raise
                self._send_key_by_key(batch)
            self.tags.clear()
            del self.pending[: len(batch)]
            if self.refused:
                self.pending = [m for m in self.pending if m.key not in self.refused]

    def _send_key_by_key(self, batch: list[Metric]) -> None:
        """A refused batch, again one key at a time: the keys the store refuses are said and dropped, the others
        sent. An outage on the way keeps what was not sent yet."""
        done: set[str] = set()
        for key in dict.fromkeys(m.key for m in batch):
            try:
                self.run.client.log_batch(self.run.run_id, metrics=[m for m in batch if m.key == key])
            except OUTAGE as exc:
                if not refusal(exc):
                    gone = {id(m) for m in batch if m.key in done}
                    self.pending = [m for m in self.pending if id(m) not in gone]
                    raise
                self.refused.add(key)
                log.warning("metric %r refused by the tracking store and not logged: %s", key, detail(exc))
            done.add(key)
        if self.tags:
            try:
                self.run.client.log_batch(self.run.run_id, tags=_tags(self.tags))
            except MlflowException as exc:
                if not refusal(exc):
                    raise
                log.warning("tags %s refused by the tracking store: %s", sorted(self.tags), detail(exc))

    def flush(self) -> None:
        """Send what an outage held back, waiting for the server; TrackingError if it stays away."""
        try:
            self.run.patiently(self._send_pending, "sending held-back metrics")
        except OUTAGE as exc:
            raise TrackingError(f"{len(self.pending)} metric values not logged: {exc}") from exc


def _tags(tags: Mapping[str, str]) -> list[RunTag]:
    return [RunTag(k, v) for k, v in tags.items()]


def _now_ms() -> int:
    return int(time.time() * 1000)
