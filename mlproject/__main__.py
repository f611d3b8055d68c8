"""Command line of the training job: options -> JobConfig -> pipeline; errors -> one line and an exit code.

Run `python -m mlproject --help`. MLproject's entry points call the commands here, one line each. Each command
imports what it runs inside its body, so that `--help`, a bad option and `close` never pay for torch, Lightning or
MLflow's model flavours.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from mlproject import __version__, configfile, logs, progress
from mlproject.config import (
    CHECKPOINT_ARTIFACT,
    STUDY_STAGES,
    ConfigError,
    JobConfig,
    field_names,
    parse_lr_free,
    parse_lrs,
)
from mlproject.errors import (
    DataError,
    HardwareError,
    Preempted,
    RankStopped,
    TrackingError,
    TrainingDiverged,
    UserCodeError,
    code_exited,
)
from mlproject.options import Number, OneOf, convert, job_options
from mlproject.processes import launch, ranks, stopping
from mlproject.record.environment import configure_client, pin_local_store
from mlproject.training.classpaths import add_code_path

if TYPE_CHECKING:
    from mlproject.session import Body, Session

EXIT_USAGE, EXIT_FAILED = 2, 1
PATH_FIELDS = ("data_dir", "code", "config")  # made absolute before the job may enter the code folder
log = logging.getLogger("mlproject")


@click.group()
@click.version_option(__version__, message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help=f"Log debug detail (also {logs.LEVEL_ENV}=DEBUG).")
def cli(verbose: bool) -> None:
    """Find a learning rate with an LR range test, train with it, and track everything in MLflow."""
    logs.setup(verbose)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    if not sys.stderr.isatty():  # progress bars (the range test's, MLflow's) are noise in CI logs
        os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*defined a `validation_step` but have no `val_dataloader`.*")


@cli.command("train")
@job_options(JobConfig())
@click.pass_context
def train_command(ctx: click.Context, experiment_name: str, **options: Any) -> None:
    """Range test (when --auto-lr true), then fit and test: the `main` entry point."""

    def train(session: Session) -> None:
        from mlproject import pipeline  # torch and Lightning

        result = pipeline.run(session)
        if session.here.zero:
            figures = " ".join(f"{k}={v:.4f}" for k, v in result.final.items())
            click.echo(
                f"run {session.tracker.run_id}: lr_used={result.choice.lr:.4g} ({result.choice.source}) {figures}"
            )

    _run_job(ctx, _config(options, JobConfig()), experiment_name, "train", train)


@cli.command("lr-find")
@job_options(JobConfig())
@click.pass_context
def lr_find_command(ctx: click.Context, experiment_name: str, **options: Any) -> None:
    """The range test alone: logs the curve and the suggestion, trains nothing."""

    def lr_find(session: Session) -> None:
        from mlproject import pipeline  # torch and Lightning

        choice = pipeline.lr_find(session)
        if session.here.zero:
            click.echo(
                f"run {session.tracker.run_id}: lr_suggested={choice.suggested:.4g} ({choice.source}); a one-cycle "
                f"fit would peak at {choice.lr:.4g}"
            )

    _run_job(ctx, _config(options, JobConfig()), experiment_name, "lr-find", lr_find)


@cli.command("compare")
@click.option(
    "--lrs", default="1e-5,1e-4,1e-1", show_default=True, help="Comma-separated fixed LRs, one child run each."
)
@click.option(
    "--stage",
    type=OneOf(STUDY_STAGES),
    default="all",
    show_default=True,
    help="all: the whole study here; plan: the parent run, its range test and study.json; member: one member.",
)
@click.option(
    "--lr-free",
    default="",
    help="Learning-rate-free optimizers trained as members too, comma-separated: schedulefree, prodigy (the "
    "built-in networks').",
)
@click.option("--parent-run", default="", help="stage=member: the study's parent run id.")
@click.option("--member", default="", help="stage=member: the member to train, a label of study.json (lr=1e-05).")
@click.option(
    "--parallel",
    type=Number(int),
    default=1,
    show_default=True,
    help="Members trained at once, each in its own process (and on its own GPU when there are several).",
)
@job_options(JobConfig(auto_lr=True))
@click.pass_context
def compare_command(
    ctx: click.Context,
    experiment_name: str,
    lrs: str,
    lr_free: str,
    stage: str,
    parent_run: str,
    member: str,
    parallel: int,
    **options: Any,
) -> None:
    """The LR study: one parent run, a child run per LR in --lrs and one at the finder's LR (--auto-lr true)."""
    from mlproject import study  # torch and Lightning

    study_lrs, study_free = parse_lrs(lrs), parse_lr_free(lr_free)
    if not 1 <= parallel <= 64:
        raise ConfigError("parallel", parallel, "an integer from 1 to 64")
    invocation = _config(options, JobConfig(auto_lr=True))
    if study_free and invocation.cfg.user_module:
        raise ConfigError("lr_free", lr_free, "empty for a LightningModule of your own (its optimizer is its own)")
    if parallel > 1 and invocation.cfg.devices * invocation.cfg.num_nodes > 1:
        raise ConfigError("parallel", parallel, "1 when a member trains on several devices (devices x num_nodes > 1)")
    if stage == "member":
        if not parent_run or not member:
            raise ConfigError("parent_run" if not parent_run else "member", "", "a value with --stage member")
        configure_client()
        plan = study.read_plan(os.environ.get("MLFLOW_TRACKING_URI", ""), parent_run)
        cfg = study.member_config(invocation.cfg, plan, member)

        def one(session: Session) -> None:
            study.run_member(session, plan, member)
            if session.here.zero:
                study.finish_if_complete(session, plan, member)
                click.echo(f"run {session.tracker.run_id}: member {member} of study {plan.parent_run}")

        _run_job(ctx, Invocation(cfg, invocation.from_file), experiment_name, "compare", one, parent_run)
        return

    def compare(session: Session) -> None:
        if stage == "plan":
            plan = study.plan_study(session, study_lrs, study_free)
            if session.here.zero:
                click.echo(f"study {plan.parent_run}: {json.dumps(plan.as_json())}")
            return
        table = study.run_all(session, study_lrs, parallel, study.member_argv(ctx.obj["argv"]), study_free)
        if session.here.zero:
            click.echo(f"study {session.tracker.run_id}:\n{table}", nl=False)

    _run_job(ctx, invocation, experiment_name, "compare", compare)


@cli.command("check")
@job_options(JobConfig())
def check_command(experiment_name: str, **options: Any) -> None:
    """Check what the job would train, without training or tracking: the parameters, the user's classes (imported
    from --code and built), where the LR goes, and the data up to its first batch, as the job checks them. One line,
    exit 0; or the one-line error the job would give, exit 2."""
    from mlproject.training import preview  # torch and Lightning

    cfg = _config(options, JobConfig()).cfg
    _enter_code_folder(cfg, tracked=False)
    click.echo(f"ok: {preview.describe(cfg)}")


@cli.command("close")
@click.argument("run_id")
def close_command(run_id: str) -> None:
    """End a RUNNING run whose process is gone (killed outright, a lost node) as FAILED, with why in error.txt.

    Refused while the process still runs: on its own host it is looked up, elsewhere its heartbeat must have
    stopped. Continue the run afterwards with --resume RUN_ID when it has a checkpoint.
    """
    import time

    from mlproject.record import ownership  # mlflow

    configure_client()
    status = ownership.close_run(os.environ.get("MLFLOW_TRACKING_URI", ""), run_id, time.time())
    click.echo(f"run {run_id}: {status}")


@dataclass(frozen=True)
class Invocation:
    """The job's configuration, and the names of the values a config file set (recorded as config.<name> tags)."""

    cfg: JobConfig
    from_file: tuple[str, ...] = ()


def _config(options: dict[str, Any], defaults: JobConfig) -> Invocation:
    """The options, over a LightningCLI config file when one is given; the user's code on the import path."""
    from_file: dict[str, Any] = {}
    if options["config"]:
        found = configfile.load(options["config"], field_names())
        from_file = {name: convert(name, value) for name, value in found.items()}
        options = configfile.merge(from_file, options, defaults.as_dict())
    cfg = JobConfig(**options)
    cfg = cfg.replace(**{k: os.path.abspath(getattr(cfg, k)) for k in PATH_FIELDS if getattr(cfg, k)})
    add_code_path(cfg.code)
    return Invocation(cfg, tuple(k for k, v in from_file.items() if options[k] == v))


def _enter_code_folder(cfg: JobConfig, tracked: bool = True) -> None:
    """Run from the user's code folder, so that a relative path in their code resolves as in their own checkout
    (`mlflow run` runs from this project's); the local store stays where it was named, and so do its artifacts:
    MLflow puts a new experiment's artifacts in ./mlruns of the folder its sqlite store was first opened from in
    the process, so it is opened here, before the move (`check`, which tracks nothing, leaves it alone)."""
    if cfg.code:
        pin_local_store(os.environ, os.getcwd())
        uri = os.environ["MLFLOW_TRACKING_URI"]
        if tracked and uri.startswith("sqlite:"):
            from mlproject.record import stores  # mlflow: the session has imported it already

            stores.probe(uri)
        os.chdir(cfg.code)


def _run_job(
    ctx: click.Context, invocation: Invocation, experiment_name: str, entry: str, body: Body, parent_run: str = ""
) -> None:
    """The job on this process (one rank of several, or all of it), or on processes it launches itself."""
    from mlproject import session  # torch, Lightning and MLflow

    cfg = invocation.cfg
    run_id = os.environ.get("MLFLOW_RUN_ID", "")
    if cfg.resume and entry != "train":
        raise ConfigError("resume", cfg.resume, "nothing: only the train command resumes")
    if cfg.resume and run_id and run_id != cfg.resume:
        raise ConfigError("resume", cfg.resume, f"the run id given to `mlflow run --run-id` (here {run_id})")
    here = ranks.place()
    if ranks.needs_launch(cfg.devices, cfg.num_nodes, here):
        ctx.exit(session.supervise(cfg, experiment_name, ctx.obj["argv"]))
    session.check_world(cfg, here)
    _enter_code_folder(cfg)
    show = progress.mode(cfg.progress, sys.stderr.isatty())
    try:
        session.run(session.Start(cfg, invocation.from_file, experiment_name, entry, parent_run), body, show)
    finally:
        ranks.leave()


def _param_name(exc: click.exceptions.BadParameter) -> str:
    return exc.param.name if exc.param is not None and exc.param.name else "parameter"


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; every failure is one line on stderr (from rank 0 of several)."""
    if any(k in os.environ for k in ("MLFLOW_RUN_ID", "TORCHELASTIC_RUN_ID")):
        stopping.die_with_parent()  # launched by `mlflow run` or torchrun: stop when it goes away
    args = list(argv if argv is not None else sys.argv[1:])
    here = ranks.place()
    launch.record_start(here.rank)
    code = 1  # an exception no handler knows: its traceback follows
    try:
        code = _exit_code(args, here.zero)
    finally:
        launch.record_exit(code, here.rank)
    return code


def _exit_code(args: list[str], zero: bool) -> int:
    try:
        code = cli.main(args=args, obj={"argv": args}, prog_name=_prog_name(), standalone_mode=False)
        return code if isinstance(code, int) else 0
    except click.exceptions.BadParameter as exc:
        return _fail(f"invalid value for {_param_name(exc)}: {exc.message}", EXIT_USAGE, zero)
    except click.exceptions.UsageError as exc:
        return _fail(exc.format_message(), EXIT_USAGE, zero)
    except click.exceptions.Abort:
        return _fail("interrupted", 130, zero)
    except (ConfigError, DataError, HardwareError) as exc:
        return _fail(str(exc), EXIT_USAGE, zero)
    except (TrackingError, UserCodeError) as exc:
        return _fail(str(exc), EXIT_FAILED, zero)
    except TrainingDiverged as exc:
        kept = (
            f" (the last good checkpoint is the run's artifact {CHECKPOINT_ARTIFACT})" if exc.checkpoint_logged else ""
        )
        return _fail(f"{exc}{kept}", EXIT_FAILED, zero)
    except Preempted as exc:
        if zero:
            click.echo(f"error: {exc}; {_stopped(exc)}", err=True)
        return 128 + signal.Signals[exc.signal_name].value
    except KeyboardInterrupt:
        return _fail("interrupted", 130, zero)
    except RankStopped:  # rank 0 said what the mistake was
        return EXIT_USAGE
    except SystemExit as exc:  # code that exited outside a session (a check, a study's plan): a failure all the same
        return _fail(code_exited(exc), EXIT_FAILED, zero)


def _prog_name() -> str:
    """How the job was invoked, for --help: `python -m mlproject` or its console script `lr-finder-job`."""
    invoked = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m mlproject" if invoked in ("", "__main__.py", "-m", "-c") else invoked


def _stopped(exc: Preempted) -> str:
    if exc.checkpoint_logged:
        return f"the run ended KILLED with its last epoch's checkpoint ({CHECKPOINT_ARTIFACT}): continue it with resume"
    return "the run ended KILLED before its first epoch ended, with no checkpoint to resume from: rerun it"


def _fail(message: str, code: int, zero: bool = True) -> int:
    click.echo(f"error: {message}", err=True)
    run_id = os.environ.get("MLFLOW_RUN_ID", "")
    if run_id and zero:  # `mlflow run` created the run before we could check anything: record why it failed
        from mlproject.record.stores import fail_run, run_is_active  # mlflow: only a failed `mlflow run` needs it

        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        try:
            if run_is_active(uri, run_id):
                fail_run(uri, run_id, message)
        except Exception as exc:  # a stale or foreign MLFLOW_RUN_ID, or no server: the one line above stands
            log.debug("could not record the failure on run %s: %s", run_id, exc)
    return code


def run() -> NoReturn:
    """The command line's entry (`python -m mlproject`, `lr-finder-job`): main(), then the process ends without
    tearing its modules down one by one. With torch, Lightning and MLflow loaded that teardown takes about 2 s of
    CPU after the run has ended (benchmarks/RESULTS.md, "The main job"): every job, DDP rank and study member paid it.
    What an exit must still do is done first: the atexit callbacks (MLflow's, temporary folders' cleanups), the
    logs and the standard streams flushed. Where a thread the job did not start still runs (a user's), the usual
    exit waits for it."""
    code = main()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others:
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
