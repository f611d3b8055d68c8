"""An experiment's runs as a markdown table (name, LR choice, test accuracy, status, link) for CI job summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlproject import markdown
from mlproject.tracking_env import run_url

if TYPE_CHECKING:
    from mlflow.entities import Run

PARENT_TAG = "mlflow.parentRunId"
COLUMNS = ("run", "lr_source", "lr_used", "lr_suggested", "test_acc", "status", "link")


class ReportError(LookupError):
    """The experiment to report on does not exist."""


@dataclass(frozen=True)
class ReportRow:
    """One run, as the table shows it; depth 1 marks a child run (one LR of a study)."""

    name: str
    run_id: str
    experiment_id: str
    depth: int
    lr_source: str
    lr_used: float | None
    lr_suggested: float | None
    test_acc: float | None
    status: str


def experiment_runs(tracking_uri: str, experiment: str) -> list[Run]:
    """Every run of the experiment, oldest first, from any tracking URI (a file database or a server)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        raise ReportError(f"no database at {tracking_uri}: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    client = MlflowClient(tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise ReportError(f"no experiment {experiment!r} at {tracking_uri}; there are: {names}")
        return list(client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"], max_results=5000))
    except MlflowException as exc:
        raise ReportError(f"cannot read runs from {tracking_uri}: {exc.message}") from exc


def rows(runs: Sequence[Run]) -> list[ReportRow]:
    """Top-level runs oldest first, each followed by its child runs; a child whose parent is gone stands alone."""
    ids = {r.info.run_id for r in runs}
    ordered = sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))
    children: dict[str, list[Run]] = {}
    for run in ordered:
        parent = run.data.tags.get(PARENT_TAG, "")
        if parent in ids:
            children.setdefault(parent, []).append(run)
    table: list[ReportRow] = []
    for run in ordered:
        if run.data.tags.get(PARENT_TAG, "") not in ids:
            table.append(_row(run, 0))
            table += [_row(child, 1) for child in children.get(run.info.run_id, [])]
    return table


def _row(run: Run, depth: int) -> ReportRow:
    params, metrics = run.data.params, run.data.metrics
    test_acc = metrics.get("test_acc", _number(params.get("test_acc")))
    return ReportRow(
        name=run.info.run_name or run.info.run_id[:8],
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        depth=depth,
        lr_source=params.get("lr_source", ""),
        lr_used=_number(params.get("lr_used")),
        lr_suggested=_number(params.get("lr_suggested")),
        test_acc=test_acc,
        status=run.info.status,
    )


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def render(experiment: str, table: Sequence[ReportRow], ui_url: str = "") -> str:
    """The summary line and the table; the best finished test_acc is bold. No ui_url: run ids instead of links.

    Names, params and statuses are whatever a run was given: escaped, so that none can inject markup."""
    finished = [r for r in table if r.status == "FINISHED" and r.test_acc is not None]
    best = max(finished, key=lambda r: r.test_acc or 0.0) if finished else None
    lines = [f"### Experiment {markdown.cell(experiment)}: {len(table)} runs, {len(finished)} finished with test_acc"]
    if best is not None:
        name, acc = markdown.cell(best.name), f"{best.test_acc:.4f}"
        lines += ["", f"Best: **{name}**, test_acc {acc} at lr_used {_lr(best.lr_used)}"]
    rows = []
    for r in table:
        acc = _acc(r.test_acc)
        rows.append([
            ("↳ " * r.depth) + markdown.cell(r.name),
            markdown.cell(r.lr_source) or "-",
            _lr(r.lr_used),
            _lr(r.lr_suggested),
            f"**{acc}**" if r is best else acc,
            markdown.cell(r.status),
            _link(r, ui_url),
        ])  # fmt: skip
    return "\n".join(lines) + "\n\n" + markdown.table(COLUMNS, rows)


def _link(row: ReportRow, ui_url: str) -> str:
    return f"[open]({run_url(ui_url, row.experiment_id, row.run_id)})" if ui_url else f"`{row.run_id}`"


def _lr(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
