"""Command line of the training job: options -> JobConfig -> pipeline; errors -> one line and an exit code.

Run `python -m mlproject --help`. MLproject's entry points call the commands here, one line each.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mlproject import stopping
from mlproject.config import CHECKPOINT_ARTIFACT, ConfigError, JobConfig, field_names, parse_lrs
from mlproject.errors import DataError, HardwareError, Preempted, TrackingError, TrainingDiverged, UserCodeError
from mlproject.options import convert, job_options
from mlproject.provenance import git_commit
from mlproject.tracking_env import configure_client

if TYPE_CHECKING:
    from mlproject.task import Task
    from mlproject.tracking import Tracker

EXIT_USAGE, EXIT_FAILED = 2, 1
log = logging.getLogger("mlproject")


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
def cli(verbose: bool) -> None:
    """Find a learning rate with an LR range test, train with it, and track everything in MLflow."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    if not sys.stderr.isatty():  # progress bars (the range test's, MLflow's) are noise in CI logs
        os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


@cli.command("train")
@job_options(JobConfig())
def train_command(experiment_name: str, **options: Any) -> None:
    """Range test (when --auto-lr true), then fit and test: the `main` entry point."""

    def train(cfg: JobConfig, job: Task, tracker: Tracker, workdir: Path) -> None:
        from mlproject import pipeline

        result = pipeline.run(cfg, job, tracker, workdir)
        figures = " ".join(f"{k}={v:.4f}" for k, v in result.final.items())
        click.echo(f"run {tracker.run_id}: lr_used={result.choice.lr:.4g} ({result.choice.source}) {figures}")

    _run_job(_config(options, JobConfig()), experiment_name, "train", train)


@cli.command("lr-find")
@job_options(JobConfig())
def lr_find_command(experiment_name: str, **options: Any) -> None:
    """The range test alone: logs the curve and the suggestion, trains nothing."""

    def lr_find(cfg: JobConfig, job: Task, tracker: Tracker, workdir: Path) -> None:
        from mlproject import pipeline

        choice = pipeline.lr_find(cfg, job, tracker)
        suggested = choice.found.suggestion.lr if choice.found else choice.lr
        click.echo(f"run {tracker.run_id}: lr_suggested={suggested:.4g} lr_used={choice.lr:.4g} ({choice.source})")

    _run_job(_config(options, JobConfig()), experiment_name, "lr-find", lr_find)


@cli.command("compare")
@click.option(
    "--lrs", default="1e-5,1e-4,1e-1", show_default=True, help="Comma-separated fixed LRs, one child run each."
)
@job_options(JobConfig(auto_lr=True))
def compare_command(experiment_name: str, lrs: str, **options: Any) -> None:
    """The LR study: one parent run, a child run per LR in --lrs and one at the finder's LR (--auto-lr true)."""
    study_lrs = parse_lrs(lrs)

    def compare(cfg: JobConfig, job: Task, tracker: Tracker, workdir: Path) -> None:
        from mlproject import study

        tracker.log_params({"lrs": ",".join(f"{lr:g}" for lr in study_lrs)})
        members = study.run_study(cfg, job, study_lrs, tracker, workdir)
        click.echo(f"study {tracker.run_id}:\n{study.summary(members)}", nl=False)

    _run_job(_config(options, JobConfig(auto_lr=True)), experiment_name, "compare", compare)


JobBody = Callable[[JobConfig, "Task", "Tracker", Path], None]


@dataclass(frozen=True)
class Invocation:
    """The job's configuration, and the names of the values a config file set (recorded as config.<name> tags)."""

    cfg: JobConfig
    from_file: tuple[str, ...] = ()


def _config(options: dict[str, Any], defaults: JobConfig) -> Invocation:
    """The options, over a LightningCLI config file when one is given; the user's code on the import path."""
    from_file: dict[str, Any] = {}
    if options["config"]:
        from mlproject import configfile

        found = configfile.load(options["config"], field_names())
        from_file = {name: convert(name, value) for name, value in found.items()}
        options = configfile.merge(from_file, options, defaults.as_dict())
    cfg = JobConfig(**options)
    from mlproject.task import add_code_path

    add_code_path(cfg.code)
    return Invocation(cfg, tuple(k for k, v in from_file.items() if options[k] == v))


def _run_job(invocation: Invocation, experiment_name: str, entry: str, body: JobBody) -> None:
    """Attach to the run, record the configuration, run the command's body; end the run as the body ended."""
    cfg = invocation.cfg
    run_id = os.environ.get("MLFLOW_RUN_ID", "")
    if cfg.resume and entry != "train":
        raise ConfigError("resume", cfg.resume, "nothing: only the train command resumes")
    if cfg.resume and run_id and run_id != cfg.resume:
        raise ConfigError("resume", cfg.resume, f"the run id given to `mlflow run --run-id` (here {run_id})")
    from mlproject import task
    from mlproject.tracking import Tracker, probe  # heavy imports only once the options are valid

    job = None if cfg.resume else task.build(cfg)  # a model or dataset that cannot be built fails before any run
    configure_client()
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    probe(uri)
    tracker = Tracker.open(uri, cfg.resume or run_id, experiment_name)
    stopping.install()
    try:
        with tempfile.TemporaryDirectory(prefix="mlproject-") as tmp:
            cfg = _record_config(invocation, tracker, Path(tmp), entry)
            body(cfg, job or task.build(cfg), tracker, Path(tmp))
    except Preempted as exc:
        tracker.end("KILLED", error=f"{exc}; continue it with resume={tracker.run_id}")
        raise
    except BaseException as exc:
        tracker.end("FAILED", error=f"{type(exc).__name__}: {exc}")
        raise
    tracker.end("FINISHED")


def _record_config(invocation: Invocation, tracker: Tracker, workdir: Path, entry: str) -> JobConfig:
    """The configuration to run: the interrupted run's own when resuming, else the invocation's, logged as params."""
    cfg = invocation.cfg
    from mlproject import pipeline

    for noisy in (
        "pytorch_lightning",
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "lightning_fabric",
        "mlflow",
        "alembic",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # after their import: Lightning sets its own level
    if cfg.resume:
        cfg = pipeline.resumed_config(tracker, workdir)
        tracker.set_tags({"resumed": "true"})  # params are write-once: its resume param keeps the first start's value
    else:
        pipeline.log_config(tracker, cfg, entry)
        # Under `mlflow run` MLflow logged every parameter's command-line value first (params are write-once).
        tracker.set_tags({f"config.{k}": cfg.as_params()[k] for k in invocation.from_file})
    commit = git_commit(Path(__file__).parent)  # `mlflow run` tags its own as mlflow.source.git.commit
    if commit:
        tracker.set_tags({"git_commit": commit})
    return cfg


def _param_name(exc: click.exceptions.BadParameter) -> str:
    return exc.param.name if exc.param is not None and exc.param.name else "parameter"


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; every failure is one line on stderr."""
    try:
        cli.main(args=argv, prog_name="python -m mlproject", standalone_mode=False)
        return 0
    except click.exceptions.BadParameter as exc:
        return _fail(f"invalid value for {_param_name(exc)}: {exc.message}", EXIT_USAGE)
    except click.exceptions.UsageError as exc:
        return _fail(exc.format_message(), EXIT_USAGE)
    except click.exceptions.Abort:
        return _fail("interrupted", 130)
    except (ConfigError, DataError, HardwareError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (TrackingError, UserCodeError) as exc:
        return _fail(str(exc), EXIT_FAILED)
    except TrainingDiverged as exc:
        return _fail(f"{exc} (the last good checkpoint is the run's artifact {CHECKPOINT_ARTIFACT})", EXIT_FAILED)
    except Preempted as exc:
        click.echo(f"error: {exc}; checkpoint logged as {CHECKPOINT_ARTIFACT}, the run ended KILLED", err=True)
        return 128 + signal.Signals[exc.signal_name].value
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(message: str, code: int) -> int:
    click.echo(f"error: {message}", err=True)
    run_id = os.environ.get("MLFLOW_RUN_ID", "")
    if run_id:  # `mlflow run` created the run before we could check anything: record why it failed
        from mlproject.tracking import fail_run, run_is_active

        if run_is_active(os.environ.get("MLFLOW_TRACKING_URI", ""), run_id):
            fail_run(os.environ.get("MLFLOW_TRACKING_URI", ""), run_id, message)
    return code


if __name__ == "__main__":
    sys.exit(main())
