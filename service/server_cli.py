"""Tracking-server commands: `lr-finder server` starts the team's MLflow server, `lr-finder report` lists runs."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import click

from service import report, server

DEFAULTS = server.ServerOptions()


@click.command("server")
@click.option(
    "--backend-store-uri",
    default=DEFAULTS.backend_store_uri,
    show_default=True,
    help="Where runs live: sqlite:///FILE for one person, postgresql://USER:PASSWORD@HOST:PORT/DB for a team.",
)
@click.option(
    "--artifacts-destination",
    default=DEFAULTS.artifacts_destination,
    show_default=True,
    help="Where the server stores artifacts that clients upload through it (a folder, s3://..., gs://...).",
)
@click.option("--host", default=DEFAULTS.host, show_default=True, help="Interface to listen on; 0.0.0.0 for all.")
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
    backend_store_uri: str,
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
    """Start the team's MLflow tracking server, print its URL once it answers, and run until Ctrl-C."""
    options = server.ServerOptions(
        backend_store_uri=backend_store_uri,
        artifacts_destination=artifacts_destination,
        host=host,
        port=port,
        workers=workers,
        app_name=app_name or "",
        auth_config=auth_config or "",
        allowed_hosts=allowed_hosts,
        job_execution=job_execution,
    )
    try:
        plan = server.plan(options, os.environ, _mlflow_exe())
    except server.ServerConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    needed = server.needed_modules(options)
    missing = sorted(pip for module, pip in needed.items() if not importlib.util.find_spec(module))
    if missing:
        raise click.ClickException(f"this server needs {', '.join(missing)}: pip install 'lr-finder[service]'")
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"starting: {server.display_argv(plan.argv)}", err=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server as cleanly as Ctrl-C
    process = server.start(plan, os.environ)
    try:
        seconds = server.wait_healthy(process, plan.health_url, wait_s)
        click.echo(f"lr-finder server: ready at {plan.url} after {seconds:.0f} s")
        click.echo(f"  clients: export MLFLOW_TRACKING_URI={plan.url}")
        code = process.wait()
    except server.ServerStartError as exc:
        server.stop(process)
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        code = server.stop(process)
        click.echo(f"lr-finder server: stopped (exit {code})", err=True)
        return
    if code != 0:
        raise click.ClickException(f"mlflow server exited with code {code}")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _mlflow_exe() -> str:
    """The mlflow beside this Python (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.exists() else "mlflow"


@click.command("report")
@click.option("--experiment", required=True, help="Experiment whose runs to list.")
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default="sqlite:///mlflow.db",
    show_default=True,
    help="Tracking server URL or database URI (default: MLFLOW_TRACKING_URI, else the local mlflow.db).",
)
@click.option(
    "--ui-url", default="", help="Base URL of the MLflow UI for the run links; default: the tracking URI if http(s)."
)
def report_command(experiment: str, tracking_uri: str, ui_url: str) -> None:
    """Print an experiment's runs as a markdown table: append it to $GITHUB_STEP_SUMMARY in CI."""
    if not ui_url and tracking_uri.startswith(("http://", "https://")):
        ui_url = tracking_uri
    try:
        runs = report.experiment_runs(tracking_uri, experiment)
    except report.ReportError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(report.render(experiment, report.rows(runs), ui_url), nl=False)


server_commands: list[click.Command] = [server_command, report_command]
