"""An experiment's runs, or one study's, as a markdown table (name, LR choice, a ranked metric, status, link) for CI
job summaries; every way of failing to read them is one ReportError line that names the URI without credentials."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from mlproject import markdown
from mlproject.tracking_env import redact, run_url
from service.server import SERVER_EXTRA, where, with_driver

if TYPE_CHECKING:
    from mlflow.entities import Experiment, Run
    from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
DEFAULT_METRIC = "test_acc"
MODES = ("max", "min")
COLUMNS = ("run", "lr_source", "lr_used", "lr_suggested", "status", "link")  # the ranked metric goes before status
HTTP_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2", "postgresql+psycopg")
URI_HELP = "use http(s)://HOST:PORT (a tracking server), sqlite:///FILE or postgresql://USER@HOST/DB"
_RUN_ID = re.compile(r"[A-Za-z0-9][\w\-]{0,255}")  # MLflow's own rule for a run id
_METRIC = re.compile(r"[\w\-./ ]{1,250}")  # MLflow's own rule for a metric key
PAGE = 1000  # runs per search request; the report pages through all of them
DB_CONNECT_TIMEOUT_S = 10  # MLflow would retry a refused database connection for about 100 s
MESSAGE_CHARS = 300  # of a library's own message, after which it is cut


class ReportError(LookupError):
    """The runs cannot be read; the message names the URI (no credentials) and what to do."""


@dataclass(frozen=True)
class Ranking:
    """Which metric picks the best run, and whether higher (max) or lower (min) is better."""

    metric: str = DEFAULT_METRIC
    mode: str = "max"


@dataclass(frozen=True)
class Found:
    """The runs to show, in the experiment they belong to; study names the parent run when only its study is."""

    experiment: str
    runs: list[Run]
    study: str = ""


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


# --- what the command line accepts (pure; ValueError says what is accepted) -----------------------------------


def tracking_uri(uri: str) -> str:
    """A tracking URI the report can read: a server over http(s), or an MLflow database."""
    parts = urlsplit(uri)
    if parts.scheme in HTTP_SCHEMES and parts.hostname:
        return uri
    if parts.scheme in DATABASE_SCHEMES and (parts.scheme != "sqlite" or uri.startswith("sqlite:///")):
        return uri
    raise ValueError(f"{where(uri)!r}: {URI_HELP}")


def ui_url(url: str) -> str:
    """A base URL of the MLflow UI for the run links ('' for none)."""
    parts = urlsplit(url)
    if url and not (parts.scheme in HTTP_SCHEMES and parts.hostname):
        raise ValueError(f"{where(url)!r}: use http(s)://HOST[:PORT], the address people open the UI at")
    return url


def link_base(ui_url: str, tracking_uri: str) -> str:
    """Where the run links point: --ui-url, else a tracking server's own address without its user information or
    query, which may hold credentials; '' (run ids, no links) for a database."""
    if ui_url or urlsplit(tracking_uri).scheme not in HTTP_SCHEMES:
        return ui_url
    return where(tracking_uri)


def experiment_name(name: str) -> str:
    """An experiment's name: anything but blank."""
    if not name.strip():
        raise ValueError("an empty name: give the experiment's name as the MLflow UI shows it")
    return name


def run_id(text: str) -> str:
    """A run id as MLflow allows it, which also keeps it safe inside a search filter's quotes."""
    if not _RUN_ID.fullmatch(text):
        raise ValueError(f"{text!r}: a run id is letters, digits, _ and - (the UI shows it on the run's page)")
    return text


def metric_key(key: str) -> str:
    """A metric name as MLflow allows it."""
    if not _METRIC.fullmatch(key):
        raise ValueError(f"{key!r}: a metric name is letters, digits, _ - . / and spaces (e.g. test_acc, val_loss)")
    return key


# --- reading the runs (MLflow, imported only here) --------------------------------------------------------------


def fetch(uri: str, experiment: str = "", parent: str = "") -> Found:
    """The experiment's runs, oldest first, or only the study of run `parent` (it and its child runs)."""
    from google.protobuf.json_format import ParseError
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    failures: tuple[type[Exception], ...] = (MlflowException,)
    if urlsplit(uri).scheme in DATABASE_SCHEMES:
        check_database(uri)  # the host install has no SQLAlchemy: only a database needs it
        from sqlalchemy.exc import SQLAlchemyError

        failures += (SQLAlchemyError,)
        uri = with_driver(uri)
    client = MlflowClient(uri)
    try:
        return _study(client, uri, parent, experiment) if parent else _experiment(client, uri, experiment)
    except ParseError as exc:  # JSON, but not MLflow's
        raise ReportError(_not_mlflow(uri)) from exc
    except failures as exc:
        raise ReportError(failure(exc, uri)) from exc


def _experiment(client: MlflowClient, uri: str, name: str) -> Found:
    found = client.get_experiment_by_name(name)
    if found is None:
        names = sorted(e.name for e in client.search_experiments(max_results=PAGE))
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "") or "none"
        raise ReportError(f"no experiment {name!r} at {where(uri)}; there are: {shown}")
    _check_answer(uri, found.name == name and bool(found.experiment_id))
    _check_active(uri, found)
    return Found(found.name, _all_runs(client, found.experiment_id))


def _study(client: MlflowClient, uri: str, parent: str, experiment: str) -> Found:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(parent)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ReportError(f"no run {parent} at {where(uri)}: check --parent (the study's parent run id)") from exc
    _check_answer(uri, run.info.run_id == parent)
    found = client.get_experiment(run.info.experiment_id)
    if experiment and found.name != experiment:
        raise ReportError(f"run {parent} is in experiment {found.name!r}, not {experiment!r}: drop --experiment")
    _check_active(uri, found)
    if run.info.lifecycle_stage == "deleted":
        raise ReportError(f"run {parent} at {where(uri)} is deleted: restore it (mlflow runs restore) first")
    children = _all_runs(client, found.experiment_id, f"tags.`{PARENT_TAG}` = '{parent}'")
    return Found(found.name, [run, *children], run.info.run_name or parent)


def _all_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list[Run]:
    """Every page of a search: an experiment may hold more runs than one answer."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, order_by=["attributes.start_time ASC"], max_results=PAGE, page_token=token
        )
        runs += page
        token = page.token
        if not token:
            return runs


def _check_answer(uri: str, looks_right: bool) -> None:
    """A server that answers JSON which is not MLflow's gives empty entities instead of an error."""
    if not looks_right:
        raise ReportError(_not_mlflow(uri))


def _check_active(uri: str, experiment: Experiment) -> None:
    if experiment.lifecycle_stage == "deleted":
        raise ReportError(
            f"experiment {experiment.name!r} at {where(uri)} is deleted: restore it"
            f" (mlflow experiments restore --experiment-id {experiment.experiment_id}) or report another"
        )


def check_database(uri: str) -> None:
    """Open a database URI once, with a time limit: it must exist and hold MLflow's tables. MLflow itself would
    create a missing sqlite file or the tables of an empty database, and retry a refused connection for minutes."""
    at = where(uri)
    try:
        import sqlalchemy
        from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError
    except ModuleNotFoundError as exc:
        hint = f"the host install reads tracking servers only: pip install '{SERVER_EXTRA}'"
        raise ReportError(f"reading the database {at} needs SQLAlchemy; {hint}") from exc
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).exists():
        raise ReportError(f"no database at {at}: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    postgres = not uri.startswith("sqlite")
    try:
        engine = sqlalchemy.create_engine(
            with_driver(uri), connect_args={"connect_timeout": DB_CONNECT_TIMEOUT_S} if postgres else {}
        )
    except (ModuleNotFoundError, NoSuchModuleError) as exc:
        raise ReportError(f"reading {at} needs its database driver: pip install '{SERVER_EXTRA}'") from exc
    try:
        with engine.connect() as connection:
            tables = set(sqlalchemy.inspect(connection).get_table_names())
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        raise ReportError(f"cannot open the database {at}: {_first_line(cause)}") from exc
    finally:
        engine.dispose()
    if not {"experiments", "runs"} <= tables:
        raise ReportError(f"{at} holds no MLflow runs: give the tracking server's address or its --backend-store-uri")


def failure(exc: BaseException, uri: str) -> str:
    """One line for what went wrong reading from uri, and what to do about it."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    at, chain = where(uri), _chain(exc)
    if any(isinstance(e, requests.Timeout) for e in chain):
        return f"{at} did not answer in time (MLFLOW_HTTP_REQUEST_TIMEOUT): is it overloaded, or the wrong address?"
    if any(isinstance(e, requests.ConnectionError) for e in chain):
        return f"cannot reach {at}: is the server running, and is --tracking-uri its address?"
    if any(isinstance(e, requests.exceptions.RetryError) for e in chain):
        return f"{at} kept failing (HTTP 5xx, retried): see the tracking server's log"
    status = exc.get_http_status_code() if isinstance(exc, MlflowException) else 0
    if status == 401:
        return f"{at} refused the credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    if status == 403:
        return f"{at} denied access (HTTP 403): ask its admin for READ permission on the experiment"
    mlflow_error = isinstance(exc, RestException) and "error_code" in exc.json
    if urlsplit(uri).scheme in HTTP_SCHEMES and not mlflow_error:
        return _not_mlflow(uri)
    return f"cannot read runs from {at}: {_first_line(exc)}"


def _not_mlflow(uri: str) -> str:
    return f"{where(uri)} is not an MLflow tracking server (it answers, but not as MLflow): check --tracking-uri"


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or during (MLflow drops the `from` of a failed request)."""
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in found:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def _first_line(exc: BaseException) -> str:
    text = redact(str(getattr(exc, "message", "") or exc)).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 1] + "…"


# --- the table (pure) --------------------------------------------------------------------------------------------


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
        cells.append([
            ("↳ " * r.depth) + markdown.cell(r.name),
            markdown.cell(r.lr_source) or "-",
            _lr(r.lr_used),
            _lr(r.lr_suggested),
            f"**{score}**" if r is top else score,
            markdown.cell(r.status),
            _link(r, ui_url),
        ])  # fmt: skip
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
