"""Reading an experiment's runs, or one study's, from a tracking server or an MLflow database; every way of failing
is one ReportError line that names the URI without credentials and says what to do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from mlproject.record.environment import redact
from service.report_options import DATABASE_SCHEMES, HTTP_SCHEMES
from service.report_table import PARENT_TAG
from service.server import SERVER_EXTRA
from service.uris import where, with_driver

if TYPE_CHECKING:
    from mlflow.entities import Experiment, Run
    from mlflow.tracking import MlflowClient

PAGE = 1000  # runs per search request; the report pages through all of them
DB_CONNECT_TIMEOUT_S = 10  # MLflow would retry a refused database connection for about 100 s
MESSAGE_CHARS = 300  # of a library's own message, after which it is cut


class ReportError(LookupError):
    """The runs cannot be read; the message names the URI (no credentials) and what to do."""


@dataclass(frozen=True)
class Found:
    """The runs to show, in the experiment they belong to; study names the parent run when only its study is."""

    experiment: str
    runs: list[Run]
    study: str = ""


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
