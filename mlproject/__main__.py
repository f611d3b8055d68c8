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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mlproject import config, stopping
from mlproject.catalog import BUILTIN_DATASETS, ENV_DIRS
from mlproject.config import CHECKPOINT_ARTIFACT, ConfigError, JobConfig, parse_lrs
from mlproject.errors import DataError, HardwareError, Preempted, TrackingError, TrainingDiverged
from mlproject.provenance import git_commit
from mlproject.tracking_env import configure_client

if TYPE_CHECKING:
    from mlproject.data import Source
    from mlproject.tracking import Tracker

EXIT_USAGE, EXIT_FAILED = 2, 1
log = logging.getLogger("mlproject")


class TrueFalse(click.ParamType):
    """true or false, in any case: the MLproject spelling. Anything else is a typo, not a default."""

    name = "true|false"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word not in ("true", "false"):
            self.fail(config.expected(value, "true or false"), param, ctx)
        return word == "true"


class Number(click.ParamType):
    """An int or a float. What cannot be one reads like every other bad value: '<value>; expected an integer'."""

    def __init__(self, kind: type[int] | type[float]) -> None:
        self.kind = kind
        self.name, self.accepted = ("integer", "an integer") if kind is int else ("number", "a number")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | float:
        if isinstance(value, self.kind) and not isinstance(value, bool):
            return value
        try:
            return self.kind(str(value).strip())
        except ValueError:
            self.fail(config.expected(value, self.accepted), param, ctx)


class OneOf(click.Choice):
    """click.Choice whose error reads like every other bad value: '<value>; expected one of a, b, c'."""

    def get_invalid_choice_message(self, value: Any, ctx: click.Context | None) -> str:
        return config.expected(value, "one of " + ", ".join(map(str, self.choices)))


# One click option per JobConfig field; the option's name is the field's name with dashes.
_OPTIONS: list[tuple[str, Any, str]] = [
    ("auto_lr", TrueFalse(), "Run the LR range test and train with its suggestion (true/false)."),
    ("lr", Number(float), "Learning rate when auto_lr is false; the fallback when the range test finds none."),
    ("epochs", Number(int), "Training epochs."),
    ("batch_size", Number(int), "Training batch size (the range test uses it too)."),
    ("optimizer", OneOf(config.OPTIMIZERS), "Optimizer (sgd uses momentum 0.9)."),
    ("schedule", OneOf(config.SCHEDULES), "LR schedule: constant, or onecycle peaking at the chosen LR."),
    ("model", OneOf(config.MODELS), "Network."),
    ("seed", Number(int), "Seed for weights, hold-out split and batch order."),
    ("dataset", OneOf(BUILTIN_DATASETS), "Dataset (MNIST-format IDX files)."),
    ("data_dir", click.STRING, "Folder with the four *-ubyte[.gz] files; empty: search (README's Data section)."),
    ("train_subset", Number(int), "Use only this many training samples; 0 uses all."),
    ("val_size", Number(int), "Validation samples held out (seeded) from the training set."),
    ("lr_min", Number(float), "Smallest LR of the range test."),
    ("lr_max", Number(float), "Largest LR of the range test."),
    ("lr_steps", Number(int), "Optimizer steps of the range test, one LR each; it stops early once the loss diverged."),
    ("lr_method", OneOf(config.LR_METHODS), "Rule that turns the range-test curve into an LR."),
    ("lr_probe", TrueFalse(), "Suggest from the loss on a fixed held-out batch after each sweep step (true/false)."),
    ("lr_repeats", Number(int), "Range tests with different seeds; the median suggestion is used, the spread logged."),
    ("accelerator", OneOf(config.ACCELERATORS), "Where to train: auto picks the GPU when there is one."),
    ("devices", Number(int), "Number of devices."),
    (
        "precision",
        OneOf(config.PRECISIONS),
        "Numeric precision; auto: bf16-mixed where the device computes bf16 natively, else 32-true.",
    ),
    ("data_mode", OneOf(config.DATA_MODES), "device: data lives on the device; loader: a DataLoader."),
    (
        "compile",
        TrueFalse(),
        "torch.compile the network for the fit (true/false); off by default: slower for LeNet on a CPU.",
    ),
    ("resume", click.STRING, "A run id: continue that run from its last checkpoint, with its configuration."),
]


def job_options(defaults: JobConfig) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return lambda func: _add_job_options(func, defaults)


def _add_job_options(func: Callable[..., Any], defaults: JobConfig) -> Callable[..., Any]:
    for name, kind, help_text in reversed(_OPTIONS):
        flag = "--" + name.replace("_", "-")
        func = click.option(flag, name, type=kind, default=getattr(defaults, name), show_default=True, help=help_text)(
            func
        )
    func = click.option(
        "--experiment-name",
        default="lr-finder",
        envvar="MLFLOW_EXPERIMENT_NAME",
        show_default=True,
        help="Experiment for runs started outside `mlflow run` (which names its own).",
    )(func)
    return func


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

    def train(cfg: JobConfig, tracker: Tracker, workdir: Path, source: Source) -> None:
        from mlproject import pipeline

        result = pipeline.run(cfg, source, tracker, workdir)
        figures = " ".join(f"{k}={v:.4f}" for k, v in result.final.items())
        click.echo(f"run {tracker.run_id}: lr_used={result.choice.lr:.4g} ({result.choice.source}) {figures}")

    _run_job(JobConfig(**options), experiment_name, "train", train)


@cli.command("lr-find")
@job_options(JobConfig())
def lr_find_command(experiment_name: str, **options: Any) -> None:
    """The range test alone: logs the curve and the suggestion, trains nothing."""

    def lr_find(cfg: JobConfig, tracker: Tracker, workdir: Path, source: Source) -> None:
        from mlproject import pipeline

        choice = pipeline.lr_find(cfg, source, tracker)
        suggested = choice.suggestion.lr if choice.suggestion else choice.lr
        click.echo(f"run {tracker.run_id}: lr_suggested={suggested:.4g} lr_used={choice.lr:.4g} ({choice.source})")

    _run_job(JobConfig(**options), experiment_name, "lr-find", lr_find)


@cli.command("compare")
@click.option(
    "--lrs", default="1e-5,1e-4,1e-1", show_default=True, help="Comma-separated fixed LRs, one child run each."
)
@job_options(JobConfig(auto_lr=True))
def compare_command(experiment_name: str, lrs: str, **options: Any) -> None:
    """The LR study: one parent run, a child run per LR in --lrs and one at the finder's LR (--auto-lr true)."""
    study_lrs = parse_lrs(lrs)

    def compare(cfg: JobConfig, tracker: Tracker, workdir: Path, source: Source) -> None:
        from mlproject import study

        tracker.log_params({"lrs": ",".join(f"{lr:g}" for lr in study_lrs)})
        members = study.run_study(cfg, study_lrs, source, tracker, workdir)
        click.echo(f"study {tracker.run_id}:\n{study.summary(members)}", nl=False)

    _run_job(JobConfig(**options), experiment_name, "compare", compare)


JobBody = Callable[[JobConfig, "Tracker", Path, "Source"], None]


def _run_job(cfg: JobConfig, experiment_name: str, entry: str, body: JobBody) -> None:
    """Attach to the run, record the configuration, run the command's body; end the run as the body ended."""
    run_id = os.environ.get("MLFLOW_RUN_ID", "")
    if cfg.resume and entry != "train":
        raise ConfigError("resume", cfg.resume, "nothing: only the train command resumes")
    if cfg.resume and run_id and run_id != cfg.resume:
        raise ConfigError("resume", cfg.resume, f"the run id given to `mlflow run --run-id` (here {run_id})")
    from mlproject.tracking import Tracker, probe  # heavy imports only once the options are valid

    configure_client()
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    probe(uri)
    tracker = Tracker.open(uri, cfg.resume or run_id, experiment_name)
    stopping.install()
    try:
        with tempfile.TemporaryDirectory(prefix="mlproject-") as tmp:
            cfg = _record_config(cfg, tracker, Path(tmp), entry)
            body(cfg, tracker, Path(tmp), _data_source(cfg))
    except Preempted as exc:
        tracker.end("KILLED", error=f"{exc}; continue it with resume={tracker.run_id}")
        raise
    except BaseException as exc:
        tracker.end("FAILED", error=f"{type(exc).__name__}: {exc}")
        raise
    tracker.end("FINISHED")


def _record_config(cfg: JobConfig, tracker: Tracker, workdir: Path, entry: str) -> JobConfig:
    """The configuration to run: the interrupted run's own when resuming, else cfg, logged as params."""
    from mlproject import pipeline

    for noisy in ("pytorch_lightning", "lightning", "lightning_fabric", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # after their import: Lightning sets its own level
    if cfg.resume:
        cfg = pipeline.resumed_config(tracker, workdir)
        tracker.set_tags({"resumed": "true"})  # params are write-once: its resume param keeps the first start's value
    else:
        pipeline.log_config(tracker, cfg, entry)
    commit = git_commit(Path(__file__).parent)  # `mlflow run` tags its own as mlflow.source.git.commit
    if commit:
        tracker.set_tags({"git_commit": commit})
    return cfg


def _data_source(cfg: JobConfig) -> Source:
    from mlproject import data

    env_dir = os.environ.get(ENV_DIRS[cfg.dataset], "")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlproject"
    return data.search_order(cfg.dataset, cfg.data_dir, env_dir, str(cache))


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
    except TrackingError as exc:
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
