"""A run's metrics, batched and held back through an outage: training never waits for the tracking server."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence

from mlflow.entities import Metric

from mlproject.errors import TrackingError
from mlproject.record.client import OUTAGE, RunClient

log = logging.getLogger(__name__)

BATCH = 1000  # MLflow's limit of metrics per log_batch


class MetricBuffer:
    """Metric rows in the order they were logged; what the server did not take yet waits in `pending` and goes out
    with the next call, or with flush()."""

    def __init__(self, run: RunClient) -> None:
        self.run = run
        self.pending: list[Metric] = []

    def log(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """One step's values; non-finite ones are dropped (MLflow would store NaN and plot garbage)."""
        now = _now_ms()
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        skipped = sorted(set(metrics) - {m.key for m in rows})
        if skipped:
            log.warning("not logging non-finite metrics %s at step %d", skipped, step)
        self._send(rows)

    def log_series(self, series: Mapping[str, Sequence[float]]) -> None:
        """Each key's values at steps 0, 1, 2, ... (a curve), non-finite values left out."""
        now = _now_ms()
        self._send(
            Metric(key, float(v), now, step)
            for key, values in series.items()
            for step, v in enumerate(values)
            if math.isfinite(v)
        )

    def _send(self, rows: Iterable[Metric]) -> None:
        self.pending.extend(rows)
        try:
            self._send_pending()
        except OUTAGE as exc:
            log.warning("tracking server unreachable, %d metric values kept for later: %s", len(self.pending), exc)

    def _send_pending(self) -> None:
        while self.pending:
            batch = self.pending[:BATCH]
            self.run.client.log_batch(self.run.run_id, metrics=batch)
            del self.pending[: len(batch)]

    def flush(self) -> None:
        """Send what an outage held back, waiting for the server; TrackingError if it stays away."""
        try:
            self.run.patiently(self._send_pending, "sending held-back metrics")
        except OUTAGE as exc:
            raise TrackingError(f"{len(self.pending)} metric values not logged: {exc}") from exc


def _now_ms() -> int:
    return int(time.time() * 1000)
