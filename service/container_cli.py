"""Container commands: `lr-finder build` (the job image) and `lr-finder run` (the job container)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from mlproject.record.environment import configure_client
from mlproject.record.provenance import git_commit
from service import job_args, launcher, run_outputs, spec
from service.container_options import DEFAULT_IMAGE, container_options, fail, job_options, plan


@click.command("build")
@click.option(
    "--context",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="The project folder (Dockerfile, .dockerignore, MLproject).",
)
@click.option("--tag", "-t", default=DEFAULT_IMAGE, show_default=True, help="Name of the image.")
@click.option("--base-image", default="", help="BASE_IMAGE [default: the Dockerfile's nvidia/cuda image].")
@click.option(
    "--torch-variant",
    type=click.Choice(spec.TORCH_VARIANTS),
    default=None,
    help="torch wheel build (driver needed: see README) [default: pypi].",
)
@click.option(
    "--build-arg",
    "pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other build arg, e.g. PIP_INDEX_URL=<mirror>; not for secrets (image history keeps it).",
)
@click.option("--network", default="", help="Network of the RUN steps; host reaches a mirror on 127.0.0.1.")
@click.option("--no-cache", is_flag=True, help="Rebuild every layer.")
def build_command(
    context: Path,
    tag: str,
    base_image: str,
    torch_variant: str | None,
    pairs: tuple[str, ...],
    network: str,
    no_cache: bool,
) -> None:
    """Build the job image, streaming the build log."""
    if not (context / "Dockerfile").is_file():
        raise fail(f"no Dockerfile in {context}: run from the project folder or pass --context", 2)
    try:
        args = spec.build_args(pairs, base_image, torch_variant or "", git_commit(context) or "unknown")
    except spec.SpecError as exc:
        raise fail(str(exc), 2) from exc
    start = time.monotonic()
    files, size = launcher.context_size(context)
    click.echo(f"lr-finder: sending the build context ({files} files, {size / 1e3:.0f} kB)")
    try:
        client = launcher.connect()
        for line in launcher.build(client, context, tag, args, network, no_cache):
            click.echo(line, nl=False)
        info = launcher.image_info(client, tag)
    except launcher.LaunchError as exc:
        raise fail(str(exc)) from exc
    click.echo(f"lr-finder: built {tag} ({info.id[:19]}) in {time.monotonic() - start:.0f} s")


@click.command("run")
@container_options
@job_options
@click.option("--experiment-name", default="", help="MLflow experiment [default: mlflow run's].")
@click.option("--run-name", default="", help="Name of the MLflow run [default: MLflow's].")
@click.option(
    "--resume",
    default="",
    metavar="RUN_ID",
    help="Continue this stopped run from its last checkpoint, with its own configuration (no -P); "
    "pass the mounts it had.",
)
@click.option("--name", default="", help="Container name [default: docker's].")
@click.option(
    "--stop-timeout",
    type=click.IntRange(1, 600),
    default=10,
    show_default=True,
    help="Seconds to wait after the stop signal before docker kills the job.",
)
@click.option(
    "--summary",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append a markdown summary (run link, LRs, final metrics) here, e.g. $GITHUB_STEP_SUMMARY.",
)
@click.option(
    "--outputs",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write run.json (run id, experiment, status, link) and the run's LR plot, lr_find/summary.json and "
    "study.json here, for a CI artifact.",
)
@click.option("--ui-url", default="", help="MLflow UI address for the run link (the tracking URI is never shown).")
@click.pass_context
def run_command(
    ctx: click.Context,
    params: tuple[str, ...],
    entry_point: str,
    experiment_name: str,
    run_name: str,
    resume: str,
    name: str,
    stop_timeout: int,
    summary: Path | None,
    outputs: Path | None,
    ui_url: str,
    **options: Any,
) -> None:
    """Run the job container (mlflow run of the baked project); the job's exit code is this command's.

    Ctrl-C or SIGTERM stops and removes the container, and the run ends KILLED: --resume RUN_ID continues it.
    """
    problem = spec.tracking_problem(options["tracking_uri"])
    if problem:
        raise fail(problem, 2)
    job: dict[str, Any] = dict(
        params=params, entry_point=entry_point, experiment=experiment_name, run_name=run_name, resume=resume
    )
    job_spec, command, env = plan(**options, **job, name=name)
    for line in job_spec.describe():
        click.echo(f"lr-finder: {line}", err=True)
    secrets = spec.secret_values(env)
    try:
        client = launcher.connect()
        info = launcher.ensure_image(client, job_spec.image, lambda line: click.echo(line, nl=False, err=True))
        outcome = launcher.supervise(
            client, job_spec, env, stop_timeout, lambda line: click.echo(spec.scrub(line, secrets), nl=False)
        )
    except launcher.LaunchError as exc:
        raise fail(str(exc)) from exc
    run_id = command.resume or job_args.find_run_id(outcome.log)
    uri, image = options["tracking_uri"], job_spec.image
    _tell_run(run_outputs.Record(uri, image, info.id, info.revision, ui_url, summary, outputs), run_id, outcome)
    ctx.exit(outcome.code)


def _tell_run(record: run_outputs.Record, run_id: str | None, outcome: launcher.Outcome) -> None:
    """The run's status and link, its --outputs and --summary, from this machine; a job that started no run has
    none."""
    if not run_id:
        if record.outputs is not None:
            click.echo(f"lr-finder: the job started no run: nothing written to {record.outputs}", err=True)
        return
    configure_client()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file, for a few kB
    for line in run_outputs.record(record, run_id, outcome.stopped):
        click.echo(f"lr-finder: {line}", err=True)


container_commands: list[click.Command] = [build_command, run_command]
