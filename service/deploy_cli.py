"""`lr-finder deploy kubernetes|slurm|study`: the committed templates filled in, to a folder or stdout."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import yaml

from service import deploy as D
from service import deploy_study
from service import deploy_target as T

# deploy/ and MLproject sit beside the service package in a checkout (an editable install), not in a wheel.
CHECKOUT = Path(__file__).resolve().parent.parent
MANIFESTS = ("indexed-job", "trainjob", "mlflow-backend")
BACKEND_HEADER = """MLflow's Kubernetes backend runs this project, from the repository root:
  mlflow run deploy/kubernetes/mlflow-backend --backend kubernetes \\
    --backend-config deploy/kubernetes/mlflow-backend/kubernetes_config.json -e main -P epochs=8
Derived from the root MLproject by `lr-finder deploy kubernetes --manifest mlflow-backend --out DIR`:
copy it here again when MLproject changes (tests/test_deploy.py compares). MLflow needs docker_env: without
--build-image it pushes this image as it is and runs each command in job-template.yaml's pod, in place of the
image's entrypoint. Each command runs under torchrun, which passes SIGTERM on to every rank. No parameter defaults
to '': MLflow hands the words over shell-quoted and without a shell. study_plan and study_member are the stages of
the compare entry point's study.
"""


def _checked(check: Callable[..., str], *args: Any) -> Callable[[click.Context, click.Parameter, str], str]:
    """A click callback around a deploy.check_* function (an empty optional value passes)."""

    def callback(ctx: click.Context, param: click.Parameter, value: str) -> str:
        if not value and not param.required and param.default == "":
            return value
        with _bad_parameter():
            return check(param.opts[0], value, *args)

    return callback


@contextmanager
def _bad_parameter() -> Iterator[None]:
    """deploy's DeployError as click's BadParameter: exit 2, one line naming the option."""
    try:
        yield
    except T.DeployError as exc:
        raise click.BadParameter(exc.detail, param_hint=exc.option) from exc


def _shared_options(slurm: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Image, sizes, experiment, job parameters and the output: the options every target takes."""
    options = [
        click.option(
            "--image",
            required=True,
            callback=_checked(T.check_image, slurm),
            help="The job image as the nodes reach it: a squashfs file or pyxis reference (host#image:tag)"
            if slurm
            else "The job image in a registry the nodes pull from (lr-finder build, then docker push).",
        ),
        click.option(
            "--nodes", type=click.IntRange(1, 1024), default=1, show_default=True, help="Nodes (machines) of the run."
        ),
        click.option(
            "--gpus-per-node",
            "gpus",
            type=click.IntRange(1, 64),
            default=1,
            show_default=True,
            help="GPUs per node; one process each.",
        ),
        click.option(
            "--experiment", default="lr-finder", show_default=True, help="MLflow experiment (MLFLOW_EXPERIMENT_NAME)."
        ),
        click.option(
            "--entry-point",
            "-e",
            "entry",
            type=click.Choice(tuple(T.ENTRY_COMMANDS)),
            default="main",
            show_default=True,
            help="MLproject entry point to run.",
        ),
        click.option("-P", "params", multiple=True, metavar="KEY=VALUE", help="A job parameter (MLproject's names)."),
        click.option(
            "--project",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            default=lambda: default_project(CHECKOUT, Path.cwd()),
            help="The checkout whose deploy/ templates and MLproject to use [default: the one lr-finder runs from, "
            "else the current folder].",
        ),
        click.option(
            "--out",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Write the files into this folder (created if needed) [default: print to stdout].",
        ),
    ]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def default_project(installed: Path, here: Path) -> Path:
    """The checkout lr-finder was installed from in place (pip install -e), else the current folder: the host
    install (pip install -c constraints.txt .) holds no templates."""
    return installed if (installed / "MLproject").is_file() else here


def _read(project: Path, relative: str) -> str:
    path = project / relative
    if not path.is_file():
        raise click.BadParameter(f"no {relative} in {project}: pass a checkout of lr-finder", param_hint="--project")
    return path.read_text()


def _target(project: Path, entry: str, params: tuple[str, ...], **values: Any) -> T.Target:
    """The Target, with -P checked against the entry point's parameters in the project's MLproject."""
    declared = yaml.safe_load(_read(project, "MLproject"))["entry_points"][entry]["parameters"]
    with _bad_parameter():
        checked = T.check_params(params, entry, declared)
    return T.Target(entry=entry, params=checked, **values)


def _emit(files: dict[str, str], out: Path | None, project: Path) -> None:
    """One file to stdout, or every file into the folder (with its subfolders); the names written go to stderr."""
    if out is not None and out.resolve().is_relative_to((project / "deploy").resolve()):
        raise click.BadParameter(f"{out} is inside the templates' folder: write elsewhere", param_hint="--out")
    if out is None:
        (text,) = files.values()
        click.echo(text, nl=False)
        return
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        click.echo(f"lr-finder: wrote {path}", err=True)


@click.group("deploy")
def deploy_group() -> None:
    """Kubernetes manifests, a Slurm batch script and CI study pipelines, filled in from deploy/'s templates."""


@deploy_group.command("kubernetes")
@_shared_options(slurm=False)
@click.option(
    "--manifest",
    type=click.Choice(MANIFESTS),
    default="indexed-job",
    show_default=True,
    help="indexed-job: Job + headless Service, no operator; trainjob: Kubeflow Trainer; mlflow-backend: the "
    "project for `mlflow run --backend kubernetes` (a folder: needs --out).",
)
@click.option(
    "--secret",
    callback=_checked(T.check_name, True),
    default="lr-finder-tracking",
    show_default=True,
    help="Secret with MLFLOW_TRACKING_URI and MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN.",
)
@click.option("--name", callback=_checked(T.check_name), default="lr-finder", show_default=True, help="Job name.")
@click.option("--namespace", callback=_checked(T.check_name), default="default", show_default=True, help="Namespace.")
@click.option(
    "--data-claim",
    callback=_checked(T.check_name, True),
    default="",
    help="PersistentVolumeClaim with the dataset, mounted read-only at /data [default: the job downloads it].",
)
def kubernetes_command(
    manifest: str, project: Path, out: Path | None, entry: str, params: tuple[str, ...], **values: Any
) -> None:
    """Write a Kubernetes manifest for the job: print it (kubectl apply -f -) or write it into --out."""
    target = _target(project, entry, params, **values)
    if manifest == "mlflow-backend" and out is None:
        raise click.BadParameter("a folder of three files: pass --out DIR", param_hint="--manifest mlflow-backend")
    with _bad_parameter():
        files = _kubernetes_files(manifest, project, target, out or Path("."))
    _emit(files, out, project)


def _kubernetes_files(manifest: str, project: Path, target: T.Target, out: Path) -> dict[str, str]:
    """The manifest's files by name: its template filled in (the backend's MLproject derived from the root one)."""
    if manifest != "mlflow-backend":
        source = f"deploy/kubernetes/{manifest}.yaml"
        docs = list(yaml.safe_load_all(_read(project, source)))
        filled = D.indexed_job(docs, target) if manifest == "indexed-job" else [D.trainjob(docs[0], target)]
        return {f"{manifest}.yaml": D.dump_yaml(filled, _header(manifest, source))}
    source = "deploy/kubernetes/mlflow-backend/job-template.yaml"
    template = D.backend_job_template(yaml.safe_load(_read(project, source)), target)
    project_file = D.backend_project(yaml.safe_load(_read(project, "MLproject")), target)
    config = D.backend_config(target, str(out / "mlflow-backend" / "job-template.yaml"))
    return {
        "mlflow-backend/MLproject": D.dump_yaml([project_file], BACKEND_HEADER, flow_leaves=True),
        "mlflow-backend/kubernetes_config.json": json.dumps(config, indent=2) + "\n",
        "mlflow-backend/job-template.yaml": D.dump_yaml([template], _header(manifest, source)),
    }


def _header(manifest: str, source: str) -> str:
    return f"Written by `lr-finder deploy kubernetes --manifest {manifest}`\nfrom {source}: its comments explain it."


@deploy_group.command("slurm")
@_shared_options(slurm=True)
@click.option(
    "--time",
    "time_limit",
    callback=_checked(T.check_time),
    default="04:00:00",
    show_default=True,
    help="Slurm's time limit; SIGTERM comes 300 s before it.",
)
def slurm_command(
    project: Path, out: Path | None, entry: str, params: tuple[str, ...], time_limit: str, **values: Any
) -> None:
    """Write the sbatch script for the job: print it, or write lr-finder.sbatch into --out."""
    target = _target(project, entry, params, **values)
    with _bad_parameter():
        text = D.sbatch(_read(project, "deploy/slurm/lr-finder.sbatch"), target, time_limit)
    _emit({"lr-finder.sbatch": text}, out, project)


@deploy_group.command("study")
@click.option(
    "--study",
    "study_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="study.json from the plan stage (lr-finder run -e compare -P stage=plan --outputs DIR).",
)
@click.option(
    "--ci",
    type=click.Choice(("github", "gitlab")),
    required=True,
    help="github: lines for $GITHUB_OUTPUT; gitlab: a child pipeline running one job per member.",
)
@click.option(
    "--pipeline",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path(".gitlab-ci.yml"),
    show_default=True,
    help="With --ci gitlab: the pipeline whose hidden jobs (.study-member and what it extends) the child reuses.",
)
def study_command(study_file: Path, ci: str, pipeline: Path) -> None:
    """The study's members for a CI fan-out: one GPU job per member, each a child run of the parent run."""
    with _bad_parameter():
        study = deploy_study.read_study(study_file.read_text())
        if ci == "github":
            click.echo(deploy_study.github_outputs(study), nl=False)
            return
        if not pipeline.is_file():
            raise T.DeployError("--pipeline", f"no file {pipeline}: pass the project's .gitlab-ci.yml")
        child = deploy_study.gitlab_child(yaml.safe_load(pipeline.read_text()), study)
    header = f"Child pipeline for study {study.parent_run}: written by `lr-finder deploy study --ci gitlab`."
    click.echo(D.dump_yaml([child], header), nl=False)


deploy_commands: list[click.Command] = [deploy_group]
