"""`lr-finder report`: an experiment's runs, or one study's, as a markdown table for a CI job summary."""

from __future__ import annotations

from collections.abc import Callable

import click

from mlproject.record.environment import configure_client
from service import report, report_options, report_table


def _checked(check: Callable[[str], str]) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    """A click callback from one of report's checks: its ValueError becomes a usage error naming the option."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        try:
            return None if value is None else check(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from exc

    return callback


@click.command("report")
@click.option(
    "--experiment",
    default=None,
    callback=_checked(report_options.experiment_name),
    help="Experiment whose runs to list; with --parent, optional (checked if given).",
)
@click.option(
    "--parent",
    metavar="RUN_ID",
    default=None,
    callback=_checked(report_options.run_id),
    help="Only this study: the parent run and its child runs.",
)
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default="sqlite:///mlflow.db",
    show_default=True,
    callback=_checked(report_options.tracking_uri),
    help="Tracking server URL or database URI (default: MLFLOW_TRACKING_URI, else the local mlflow.db).",
)
@click.option(
    "--ui-url",
    default="",
    callback=_checked(report_options.ui_url),
    help="Base URL of the MLflow UI for the run links; default: an http(s) tracking URI without credentials.",
)
@click.option(
    "--ranked-by",
    default=report_table.DEFAULT_METRIC,
    show_default=True,
    callback=_checked(report_options.metric_key),
    help="Metric that picks the best run (e.g. val_loss with --mode min).",
)
@click.option(
    "--mode",
    type=click.Choice(report_table.MODES),
    default="max",
    show_default=True,
    help="Whether the best run has the highest or the lowest --ranked-by.",
)
def report_command(
    experiment: str | None, parent: str | None, tracking_uri: str, ui_url: str, ranked_by: str, mode: str
) -> None:
    """Print an experiment's runs, or one study's, as a markdown table: append it to $GITHUB_STEP_SUMMARY in CI."""
    if not experiment and not parent:
        raise click.UsageError("give --experiment NAME, or --parent RUN_ID for one study")
    ui_url = report_options.link_base(ui_url, tracking_uri)
    configure_client()  # MLflow's own retries take minutes against a server that is down
    try:
        found = report.fetch(tracking_uri, experiment or "", parent or "")
    except report.ReportError as exc:
        raise click.ClickException(str(exc)) from exc
    table = report_table.rows(found.runs, ranked_by)
    ranking = report_table.Ranking(ranked_by, mode)
    click.echo(report_table.render(found.experiment, table, ui_url, ranking, found.study), nl=False)


report_commands: list[click.Command] = [report_command]
