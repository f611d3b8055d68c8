"""The report's table, pure: runs -> rows (each study's child runs under their parent), the best finished run by a
metric, and the markdown with every value escaped."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlproject import markdown
from mlproject.record.environment import run_url

if TYPE_CHECKING:
    from mlflow.entities import Run

PARENT_TAG = "mlflow.parentRunId"
DEFAULT_METRIC = "test_acc"
MODES = ("max", "min")
COLUMNS = ("run", "lr_source", "lr_used", "lr_suggested", "status", "link")  # the ranked metric goes before status


@dataclass(frozen=True)
class Ranking:
    """Which metric picks the best run, and whether higher (max) or lower (min) is better."""

    metric: str = DEFAULT_METRIC
    mode: str = "max"


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
    score: float | None
    status: str


def rows(runs: Sequence[Run], metric: str = DEFAULT_METRIC) -> list[ReportRow]:
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
            table.append(_row(run, 0, metric))
            table += [_row(child, 1, metric) for child in children.get(run.info.run_id, [])]
    return table


def _row(run: Run, depth: int, metric: str) -> ReportRow:
    params, metrics = run.data.params, run.data.metrics
    logged = metrics.get(metric)
    score = logged if logged is not None and math.isfinite(logged) else _number(params.get(metric))
    return ReportRow(
        name=run.info.run_name or run.info.run_id[:8],
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        depth=depth,
        lr_source=params.get("lr_source", ""),
        lr_used=_number(params.get("lr_used")),
        lr_suggested=_number(params.get("lr_suggested")),
        score=score,
        status=run.info.status,
    )


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def best(table: Sequence[ReportRow], mode: str = "max") -> ReportRow | None:
    """The finished run with the highest (max) or lowest (min) score; the earliest of equals."""
    finished = [r for r in table if r.status == "FINISHED" and r.score is not None]
    if not finished:
        return None
    pick = max if mode == "max" else min
    return pick(finished, key=lambda r: r.score or 0.0)


def render(
    experiment: str, table: Sequence[ReportRow], ui_url: str = "", ranking: Ranking = Ranking(), study: str = ""
) -> str:
    """The summary line and the table; the best finished run's metric is bold. No ui_url: run ids, not links.

    Names, params, statuses and the metric's name are whatever a run or a user gave: escaped, so that none can
    inject markup."""
    metric = markdown.cell(ranking.metric)
    top = best(table, ranking.mode)
    finished = sum(r.status == "FINISHED" and r.score is not None for r in table)
    scope = f"Study {markdown.cell(study)} in experiment" if study else "Experiment"
    lines = [f"### {scope} {markdown.cell(experiment)}: {len(table)} runs, {finished} finished with {metric}"]
    if top is not None:
        name, score = markdown.cell(top.name), _score(top.score)
        lines += ["", f"Best: **{name}**, {metric} {score} at lr_used {_lr(top.lr_used)}"]
    cells = []
    for r in table:
        score = _score(r.score)
        cells.append(
            [
                ("↳ " * r.depth) + markdown.cell(r.name),
                markdown.cell(r.lr_source) or "-",
                _lr(r.lr_used),
                _lr(r.lr_suggested),
                f"**{score}**" if r is top else score,
                markdown.cell(r.status),
                _link(r, ui_url),
            ]
        )
    header = (*COLUMNS[:4], metric, *COLUMNS[4:])
    return "\n".join(lines) + "\n\n" + markdown.table(header, cells)


def _link(row: ReportRow, ui_url: str) -> str:
    return f"[open]({run_url(ui_url, row.experiment_id, row.run_id)})" if ui_url else f"`{row.run_id}`"


def _lr(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _score(value: float | None) -> str:
    """Four decimals where they read well (accuracies, losses); significant digits for the very small or large."""
    if value is None:
        return "-"
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.4g}"
