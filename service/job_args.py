"""What the job in the container is told, decided without docker: `mlflow run`'s arguments from -P pairs (and the
run id its log names), the command that resumes a run, and the job's own check of the same parameters."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mlproject.catalog import BUILTIN_DATASETS
from service.spec import CODE_TARGET, DATA_TARGET, SpecError

RESUME_COMMAND = ("python", "-m", "mlproject", "train", "--resume")  # the image's PYTHONPATH holds mlproject
CHECK_COMMAND = ("-m", "mlproject", "check")  # the image's python's arguments: the job's check, no run, no training
# The compare entry point's own parameters (the study's, not the job's): `check` takes the job's only.
STUDY_PARAMS = ("lrs", "lr_free", "stage", "parent_run", "member", "parallel")
_RUN_ID = re.compile(r"in run with ID '([0-9a-f]{32})'")  # `mlflow run` logs this line before it starts the job
_RUN_ID_SHAPE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class JobCommand:
    """The container's command: its entrypoint (empty: the image's `mlflow run`), the arguments after it, the run
    it continues (empty: a new run), and python's arguments for the job's check of the same parameters."""

    args: tuple[str, ...]
    entrypoint: tuple[str, ...] = ()
    resume: str = ""
    check: tuple[str, ...] = ()


def job_command(
    params: Iterable[str] = (),
    entry_point: str = "main",
    experiment: str = "",
    run_name: str = "",
    resume: str = "",
    code: bool = False,
) -> JobCommand:
    """What `lr-finder run` starts in the container: `mlflow run` of the entry point, or the job resuming a run;
    code: the user's folder is mounted at CODE_TARGET."""
    params = tuple(params)
    if resume:
        return resume_command(resume, params, entry_point, experiment, run_name)
    return JobCommand(
        mlflow_run_args(params, entry_point, experiment, run_name, code), check=check_args(params, entry_point, code)
    )


def parse_params(params: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """-P key=value as (key, value) pairs, checked for shape only: the job checks the values and names what is
    wrong."""
    pairs = []
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"-P {item!r}: expected key=value, e.g. -P auto_lr=true")
        pairs.append((key, value))
    return tuple(pairs)


def job_params(params: Iterable[str], code: bool) -> tuple[tuple[str, str], ...]:
    """The job's parameters as the container gets them: -P's pairs, then code=/code for --code, and data_dir=/data
    for a dataset that is not built in (the built-ins are searched for)."""
    pairs = parse_params(params)
    given = dict(pairs)
    if code:
        if "code" in given:
            raise SpecError(f"--code mounts the folder at {CODE_TARGET} and passes -P code={CODE_TARGET}: drop -P code")
        pairs += (("code", CODE_TARGET),)
    if given.get("dataset", BUILTIN_DATASETS[0]) not in BUILTIN_DATASETS and not given.get("data_dir"):
        pairs += (("data_dir", DATA_TARGET),)
    return pairs


def mlflow_run_args(
    params: tuple[str, ...], entry_point: str, experiment: str, run_name: str, code: bool
) -> tuple[str, ...]:
    """`mlflow run`'s arguments after the project: the entry point, the run's names, and the job's parameters."""
    args: tuple[str, ...] = ("-e", entry_point)
    if experiment:
        args += ("--experiment-name", experiment)
    if run_name:
        args += ("--run-name", run_name)
    return args + tuple(word for key, value in job_params(params, code) for word in ("-P", f"{key}={value}"))


def check_args(params: Iterable[str], entry_point: str = "main", code: bool = False) -> tuple[str, ...]:
    """`python -m mlproject check` of the parameters the job would get: each key_name=value as --key-name value,
    less compare's study parameters."""
    skip = STUDY_PARAMS if entry_point == "compare" else ()
    pairs = [(key, value) for key, value in job_params(params, code) if key not in skip]
    return CHECK_COMMAND + tuple(word for key, value in pairs for word in ("--" + key.replace("_", "-"), value))


def resume_command(
    run_id: str, params: tuple[str, ...], entry_point: str, experiment: str, run_name: str
) -> JobCommand:
    """The job itself continuing a run, not `mlflow run`, which would start a new run (or, given the run's id,
    log its parameters again)."""
    if not _RUN_ID_SHAPE.fullmatch(run_id):
        raise SpecError(
            f"--resume {run_id!r}: pass the id of the stopped run, as its KILLED line or the MLflow UI shows it"
        )
    named = {"-P": bool(params), "--entry-point": entry_point != "main", "--experiment-name": bool(experiment)}
    ignored = [flag for flag, given in {**named, "--run-name": bool(run_name)}.items() if given]
    if ignored:
        raise SpecError(f"--resume continues the run with its own configuration and names: drop {', '.join(ignored)}")
    return JobCommand((run_id,), RESUME_COMMAND, run_id)


def find_run_id(log: str) -> str | None:
    """The MLflow run `mlflow run` created, from its log; None when it never got that far."""
    found = _RUN_ID.search(log)
    return found.group(1) if found else None
