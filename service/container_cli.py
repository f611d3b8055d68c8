"""Container commands: `lr-finder build`, `lr-finder run` (the job container) and `lr-finder doctor`."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mlproject.catalog import FASHION_MNIST_DIR
from mlproject.provenance import git_commit
from mlproject.tracking_env import configure_client, run_url
from service import launcher, spec

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

DEFAULT_IMAGE = "lr-finder:latest"
DEBIAN_DATASET = Path(FASHION_MNIST_DIR)


def _fail(message: str, code: int = 1) -> click.ClickException:
    exc = click.ClickException(message)
    exc.exit_code = code
    return exc


def _container_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options `run` and `doctor` share, so that doctor checks exactly what run would launch."""
    default_data = str(DEBIAN_DATASET) if DEBIAN_DATASET.is_dir() else ""
    options = [
        click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="The job image (lr-finder build)."),
        click.option("--gpus", default="all", show_default=True, help="all, a count, device=ID[,ID...] or none."),
        click.option(
            "--data",
            default=default_data,
            help="Dataset: a folder (one that exists here, or any path with a slash) or else a docker volume, "
            f"mounted read-only at /data [default: {DEBIAN_DATASET} when present].",
        ),
        click.option(
            "--cache",
            default="",
            help="Folder or volume (as --data) for the job's downloads (the dataset if --data has none), "
            "at ~/.cache in the container.",
        ),
        click.option(
            "--tracking-uri",
            envvar=spec.TRACKING_ENV,
            default="",
            help=f"MLflow tracking server as the container reaches it [default: ${spec.TRACKING_ENV}]; never printed.",
        ),
        click.option(
            "--env",
            "env_extra",
            multiple=True,
            metavar="NAME",
            help="Also pass this variable, by name, "
            "from this environment (credentials MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN always are).",
        ),
        click.option(
            "--network", default="", help="Docker network; host reaches a server on this machine's 127.0.0.1."
        ),
        click.option("--shm-size", default="2g", show_default=True, help="Shared memory (DataLoader workers)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _plan(
    image: str,
    gpus: str,
    data: str,
    cache: str,
    tracking_uri: str,
    env_extra: tuple[str, ...],
    network: str,
    shm_size: str,
    code: str = "",
    **job: Any,
) -> tuple[spec.LaunchSpec, dict[str, str]]:
    """The launch spec and the values of its environment (read here, at the command line, and only passed on)."""
    environ = {**os.environ, spec.TRACKING_ENV: tracking_uri}
    try:
        names = spec.env_names(environ, env_extra)
        sources = {"data": _source("--data", data), "cache": _source("--cache", cache), "code": _folder("--code", code)}
        job_spec = spec.launch_spec(image, gpus, shm_size, names=names, network=network, **sources, **job)
    except spec.SpecError as exc:
        raise _fail(str(exc), 2) from exc
    return job_spec, {n: environ[n] for n in names}


def _source(option: str, value: str) -> str:
    """A mount's source as docker takes it: a folder here as an absolute path, or a volume's name."""
    path = Path(value).expanduser()
    if value and spec.is_host_folder(value, path.is_dir()):
        return _folder(option, value)
    return value


def _folder(option: str, value: str) -> str:
    """A folder here (relative, or under ~), as the absolute path docker binds."""
    if not value:
        return ""
    path = Path(value).expanduser()
    if not path.is_dir():
        raise spec.SpecError(f"{option} {value}: no such folder on this machine")
    return str(path.resolve())


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
        raise _fail(f"no Dockerfile in {context}: run from the project folder or pass --context", 2)
    try:
        args = spec.build_args(pairs, base_image, torch_variant or "", git_commit(context) or "unknown")
    except spec.SpecError as exc:
        raise _fail(str(exc), 2) from exc
    start = time.monotonic()
    files, size = launcher.context_size(context)
    click.echo(f"lr-finder: sending the build context ({files} files, {size / 1e3:.0f} kB)")
    try:
        client = launcher.connect()
        for line in launcher.build(client, context, tag, args, network, no_cache):
            click.echo(line, nl=False)
        info = launcher.image_info(client, tag)
    except launcher.LaunchError as exc:
        raise _fail(str(exc)) from exc
    click.echo(f"lr-finder: built {tag} ({info.id[:19]}) in {time.monotonic() - start:.0f} s")


@click.command("run")
@_container_options
@click.option("-P", "params", multiple=True, metavar="KEY=VALUE", help="A job parameter, passed to mlflow run.")
@click.option("--entry-point", "-e", default="main", show_default=True, help="MLproject entry point.")
@click.option("--experiment-name", default="", help="MLflow experiment [default: mlflow run's].")
@click.option("--run-name", default="", help="Name of the MLflow run [default: MLflow's].")
@click.option(
    "--code",
    default="",
    metavar="DIR",
    help="Your code's folder, mounted read-only at /code and passed as -P code=/code (the job imports from it).",
)
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
        raise _fail(problem, 2)
    job = dict(params=params, entry_point=entry_point, experiment=experiment_name, run_name=run_name, resume=resume)
    job_spec, env = _plan(**options, **job, name=name)
    for line in job_spec.describe():
        click.echo(f"lr-finder: {line}", err=True)
    secrets = list(env.values())
    try:
        client = launcher.connect()
        info = launcher.ensure_image(client, job_spec.image, lambda line: click.echo(line, nl=False, err=True))
        outcome = launcher.supervise(
            client, job_spec, env, stop_timeout, lambda line: click.echo(spec.scrub(line, secrets), nl=False)
        )
    except launcher.LaunchError as exc:
        raise _fail(str(exc)) from exc
    run_id = job_spec.resume or spec.find_run_id(outcome.log)
    if run_id:
        record = Record(options["tracking_uri"], job_spec.image, info, ui_url, summary, outputs)
        _record(record, run_id, outcome.stopped)
    elif outputs is not None:
        click.echo(f"lr-finder: the job started no run: nothing written to {outputs}", err=True)
    ctx.exit(outcome.code)


@dataclass(frozen=True)
class Record:
    """Where `run` reports a run once the container is done: the server, the image, the link, the files."""

    uri: str
    image: str
    info: launcher.ImageInfo
    ui_url: str
    summary: Path | None
    outputs: Path | None


def _record(record: Record, run_id: str, stopped: bool) -> None:
    """From this machine: a stopped run ends KILLED; tag the image; print the link; write the summary and outputs."""
    configure_client()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file, for a few kB
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(record.uri)
    try:
        run = _close_and_tag(client, record, run_id, stopped)
        link = run_url(record.ui_url, run.info.experiment_id, run_id)
        facts = spec.run_record(run_id, run.info.experiment_id, run.info.status, link)
        written = _write_outputs(client, record.outputs, facts) if record.outputs is not None else []
    except MlflowException as exc:
        reason = spec.scrub(exc.message, [record.uri])
        click.echo(f"lr-finder: run {run_id}: cannot reach the tracking server from here: {reason}", err=True)
        return
    where = link or f"(experiment {run.info.experiment_id}; --ui-url for a link)"
    click.echo(f"lr-finder: run {run_id} {run.info.status} {where}", err=True)
    if written:
        click.echo(f"lr-finder: wrote {', '.join(map(str, written))}", err=True)
    if record.summary is not None:
        figures = {**run.data.params, **{k: f"{v:.4g}" for k, v in run.data.metrics.items()}}
        with record.summary.open("a") as out:
            out.write(spec.summary_markdown(run_id, run.info.status, link, figures))


def _close_and_tag(client: MlflowClient, record: Record, run_id: str, stopped: bool) -> Run:
    """The run as it ends: KILLED when the container was stopped, tagged with the image it ran in."""
    tags = {"mlflow.docker.image.uri": record.image, "mlflow.docker.image.id": record.info.id}
    if record.info.revision not in ("", "unknown"):  # the image has no .git: the build recorded the commit
        tags["mlflow.source.git.commit"] = record.info.revision
    if stopped and client.get_run(run_id).info.status != "KILLED":
        client.set_terminated(run_id, "KILLED")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return client.get_run(run_id)


def _write_outputs(client: MlflowClient, folder: Path, facts: dict[str, str]) -> list[Path]:
    """run.json, and those of spec.OUTPUT_ARTIFACTS the run has, kept at their artifact paths under folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(facts, indent=2) + "\n")
    run_id = facts["run_id"]
    parents = {path.rpartition("/")[0] for path in spec.OUTPUT_ARTIFACTS}
    present = {item.path for parent in parents for item in client.list_artifacts(run_id, parent or None)}
    found = [path for path in spec.OUTPUT_ARTIFACTS if path in present]
    for path in found:
        into = (folder / path).parent  # a single file lands in dst_path itself, without its artifact folders
        into.mkdir(parents=True, exist_ok=True)
        client.download_artifacts(run_id, path, str(into))
    return [folder / "run.json", *(folder / path for path in found)]


@click.command("doctor")
@_container_options
def doctor_command(**options: Any) -> None:
    """Check the Docker engine, a GPU in a container, the tracking server and the dataset; exit 1 if any fails."""
    job_spec, env = _plan(**options)
    try:
        client = launcher.connect()
    except launcher.LaunchError as exc:
        _report([("docker engine", False, str(exc), spec.ENGINE_HINT)])
    results = [("docker engine", True, launcher.engine_version(client), "")]
    try:
        info = launcher.image_info(client, job_spec.image)
    except launcher.LaunchError as exc:
        _report([*results, ("image", False, str(exc), f"lr-finder build --tag {job_spec.image}")])
    results.append(("image", True, f"{job_spec.image} ({info.id[:19]}, user {info.user})", ""))
    problem = spec.tracking_problem(options["tracking_uri"])
    for probe in spec.doctor_probes(job_spec):
        if probe.name == "tracking server" and problem:
            results.append((probe.name, False, problem, probe.hint))
            continue
        ok, answer = launcher.probe(client, job_spec, env, probe)
        results.append((probe.name, ok, spec.scrub(answer, env.values()), probe.hint))
    _report(results)


def _report(results: list[tuple[str, bool, str, str]]) -> None:
    """One line per check, a fix under each failure; exit 1 if any failed."""
    for check, ok, detail, hint in results:
        click.echo(f"{'ok  ' if ok else 'FAIL'}  {check}: {detail}")
        if not ok:
            click.echo(f"      fix: {hint}")
    failed = sum(not ok for _, ok, _, _ in results)
    if failed:
        raise _fail(f"{failed} check(s) failed")


container_commands: list[click.Command] = [build_command, run_command, doctor_command]
