"""`lr-finder server`: start the team's MLflow tracking server, print its URL once it answers, stop it cleanly."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import click
from click.core import ParameterSource

from service import server, server_process, uris

DEFAULTS = server.ServerOptions()


@click.command("server")
@click.option(
    "--backend-store-uri",
    envvar=server.BACKEND_URI_ENV,
    show_envvar=True,
    default=None,
    help="Where runs live: sqlite:///FILE for one person, postgresql://USER:PASSWORD@HOST:PORT/DB for a team"
    f" [default: {DEFAULTS.backend_store_uri}]. A password typed here shows in `ps`: set the variable instead,"
    " or use --backend-store-uri-file.",
)
@click.option(
    "--backend-store-uri-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A file (e.g. a mounted secret, mode 600) whose first line is the backend store URI.",
)
@click.option(
    "--artifacts-destination",
    envvar=server.ARTIFACTS_ENV,
    show_envvar=True,
    default=DEFAULTS.artifacts_destination,
    show_default=True,
    help="Where the server stores artifacts that clients upload through it (a folder, s3://..., gs://...).",
)
@click.option(
    "--host",
    default=DEFAULTS.host,
    show_default=True,
    help="Interface to listen on: an IP address (IPv6 with or without brackets) or a host name; 0.0.0.0 or :: for all.",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=DEFAULTS.port, show_default=True, help="Port to listen on."
)
@click.option(
    "--workers", type=click.IntRange(1, 64), default=DEFAULTS.workers, show_default=True, help="Worker processes."
)
@click.option(
    "--app-name",
    type=click.Choice(server.APP_NAMES),
    default=None,
    help=f"basic-auth: users and passwords (needs {server.AUTH_SECRET_ENV} and {server.AUTH_PASSWORD_ENV}).",
)
@click.option(
    "--auth-config",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="basic-auth's ini file (user database, default permission, admin); default: MLflow's own.",
)
@click.option("--allowed-hosts", default="", help="Host headers to accept, comma-separated; default: MLflow's.")
@click.option(
    "--job-execution/--no-job-execution",
    default=False,
    show_default=True,
    help="MLflow's background job runner (GenAI judges and trace jobs; eight more processes). Runs do not need it.",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(1, 600),
    default=120,
    show_default=True,
    help="Seconds to wait for the server to answer /health before giving up.",
)
def server_command(
    backend_store_uri: str | None,
    backend_store_uri_file: str | None,
    artifacts_destination: str,
    host: str,
    port: int,
    workers: int,
    app_name: str | None,
    auth_config: str | None,
    allowed_hosts: str,
    job_execution: bool,
    wait_s: float,
) -> None:
    """Start the team's MLflow tracking server, print its URL once it answers, and run until Ctrl-C or SIGTERM.

    The files it creates (a sqlite store, basic-auth's users, artifacts) are readable by its user only."""
    options = server.ServerOptions(
        backend_store_uri=_backend_store_uri(backend_store_uri, backend_store_uri_file),
        artifacts_destination=artifacts_destination,
        host=host,
        port=port,
        workers=workers,
        app_name=app_name or "",
        auth_config=auth_config or "",
        allowed_hosts=allowed_hosts,
        job_execution=job_execution,
    )
    plan = _checked_plan(options)
    for warning in (*_typed_secrets(options), *plan.warnings, *_exposed_files(options, backend_store_uri_file)):
        click.echo(f"warning: {warning}", err=True)
    _check_port(plan)
    click.echo(f"starting: {plan.shown}", err=True)
    _serve(plan, wait_s)


def _backend_store_uri(typed: str | None, path: str | None) -> str:
    """The URI from the option or its variable, else from the file; both typed at once is a mistake."""
    if path is None:
        return typed or DEFAULTS.backend_store_uri
    if _typed("backend_store_uri"):
        hint = "--backend-store-uri-file"
        raise click.BadParameter("give the URI once: here or in --backend-store-uri", param_hint=hint)
    try:
        return server.uri_from_file(Path(path).read_text(), path)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint="--backend-store-uri-file") from exc
    except server.ServerConfigError as exc:
        raise click.BadParameter(str(exc), param_hint=exc.option) from exc


def _checked_plan(options: server.ServerOptions) -> server.ServerPlan:
    """The plan, once the options and the Python modules allow a working server."""
    try:
        plan = server.plan(options, os.environ, _mlflow_exe())
    except server.ServerConfigError as exc:
        raise click.BadParameter(str(exc), param_hint=exc.option) from exc
    needed = server.needed_modules(options)
    missing = sorted({pip for module, pip in needed.items() if importlib.util.find_spec(module) is None})
    if missing:
        installs = f"pip install '{server.SERVER_EXTRA}'"
        raise click.ClickException(f"lr-finder server needs {', '.join(missing)}, not installed here: {installs}")
    return plan


def _check_port(plan: server.ServerPlan) -> None:
    """Refuse, before anything starts, a port another process holds or an address this machine does not have."""
    try:
        server_process.check_port(plan.host, plan.port)
    except server.ServerConfigError as exc:
        raise click.BadParameter(str(exc), param_hint=exc.option) from exc
    except server.ServerStartError as exc:
        raise click.ClickException(str(exc)) from exc


def _typed(param: str) -> bool:
    return click.get_current_context().get_parameter_source(param) is ParameterSource.COMMANDLINE


def _typed_secrets(options: server.ServerOptions) -> list[str]:
    """A password typed on the command line stays in this process's argv, which every local user can read."""
    typed = {
        ("--backend-store-uri", server.BACKEND_URI_ENV, "backend_store_uri"): options.backend_store_uri,
        ("--artifacts-destination", server.ARTIFACTS_ENV, "artifacts_destination"): options.artifacts_destination,
    }
    return [
        f"{option} holds a password, visible to every user of this machine (ps) while this runs: set {env} instead"
        for (option, env, param), uri in typed.items()
        if _typed(param) and uris.has_password(uri)
    ]


def _exposed_files(options: server.ServerOptions, uri_file: str | None) -> list[str]:
    """Files made before lr-finder kept them private stay readable by other users until changed."""
    paths = [*server.private_paths(options), *([Path(uri_file)] if uri_file else [])]
    found = []
    for path in paths:
        with contextlib.suppress(OSError):  # not there yet: it will be made private
            mode = path.stat().st_mode
            if server.exposed(mode):
                fix = "chmod 700" if path.is_dir() else "chmod 600"
                found.append(f"{path} is readable by other users (mode {mode & 0o777:o}): {fix} {path}")
    return found


def _serve(plan: server.ServerPlan, wait_s: float) -> None:
    """Start, wait for /health, then run until a signal; a server that ends on its own is an error with its code."""
    for sig in (signal.SIGTERM, signal.SIGHUP):  # `kill` or a closed terminal stop the server as cleanly as Ctrl-C
        signal.signal(sig, _interrupt)
    process = None
    try:
        process = server_process.start(plan, os.environ)
        seconds = server_process.wait_healthy(process, plan, wait_s)
        click.echo(f"lr-finder server: ready at {plan.url} after {seconds:.0f} s")
        click.echo(f"  clients: export MLFLOW_TRACKING_URI={plan.url}")
        code = process.wait()
        server_process.stop(process)  # uvicorn's workers outlive a server killed under them
        raise click.ClickException(
            f"mlflow server stopped on its own ({server_process.exit_reason(code)}); see its output"
        )
    except server.ServerStartError as exc:
        if process is not None:
            server_process.stop(process)
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        if process is not None:
            code = server_process.stop(process)
            click.echo(f"lr-finder server: stopped ({server_process.exit_reason(code)})", err=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _mlflow_exe() -> str:
    """The mlflow beside this Python (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.exists() else "mlflow"


server_commands: list[click.Command] = [server_command]
