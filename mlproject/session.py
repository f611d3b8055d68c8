"""One job's run from start to end, on every rank. Rank 0 attaches to the run (or starts it), records the
configuration and, while the job lives, a heartbeat; the other ranks get rank 0's configuration and resume state
through the process group and never contact the tracking server. The run ends as the job ended; one that lost its
process can be told apart (close) and resumed. A job of several devices on one machine starts here as their
supervisor (torchrun's launcher)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlproject.config import ConfigError, JobConfig
from mlproject.errors import Preempted, RankStopped, UserCodeError, code_exited
from mlproject.processes import launch, ranks, stopping, threads
from mlproject.record import ownership, runconfig, stores
from mlproject.record.environment import configure_client, redact
from mlproject.record.ownership import Heartbeat
from mlproject.record.provenance import git_commit
from mlproject.record.reader import RunReader
from mlproject.record.tracker import RUN_NAME_TAG, NullTracker, RunTracker, Tracker
from mlproject.training import task
from mlproject.training.task import Task

log = logging.getLogger(__name__)

# `mlflow run` names a run like this (crawling-owl-123) unless told otherwise: the job then names it for what it is.
MLFLOW_RANDOM_NAME = re.compile(r"[a-z]+-[a-z]+-\d{1,4}")


@dataclass(frozen=True)
class Resume:
    """What a resumed run continues from: its checkpoint (a local file on every rank) and its LR choice."""

    checkpoint: Path
    lr: float
    source: str


@dataclass(frozen=True)
class Start:
    """What the command line asked for: the configuration, the names a config file set, where the run goes."""

    cfg: JobConfig
    from_file: tuple[str, ...]
    experiment_name: str
    entry: str  # train, lr-find or compare: config.json records it
    parent_run: str = ""  # a study's member: its run is a child of this one


@dataclass(frozen=True)
class Session:
    """What a job's body works with on its rank. Rank 0 alone has a reader and a heartbeat."""

    cfg: JobConfig
    job: Task
    tracker: Tracker  # RunTracker on rank 0, NullTracker elsewhere
    workdir: Path
    resume: Resume | None
    here: ranks.Place
    show: str = "lines"  # progress: bar, lines or off (resolved from cfg.progress where the output is known)
    reader: RunReader | None = None
    heartbeat: Heartbeat | None = None

    def reads(self) -> RunReader:
        """The run's store, read back; rank 0 alone reads it."""
        if self.reader is None:
            raise RuntimeError(f"rank {self.here.rank} reads nothing from the tracking server: rank 0 alone does")
        return self.reader


Body = Callable[[Session], None]


def run(start: Start, body: Body, show: str = "lines") -> None:
    """Open the session on every rank, run the body, end the run as the body ended."""
    here = ranks.place()
    stopping.install()
    ranks.join(here, gpu=_wants_gpu(start.cfg))
    with tempfile.TemporaryDirectory(prefix="mlproject-") as tmp:
        session = _open_zero(start, Path(tmp), here) if here.zero else _open_other(Path(tmp), here)
        session = dataclasses.replace(session, show=show if here.zero else "off")
        try:
            body(session)
        except Preempted as exc:
            _end(session, "KILLED", stop_note(exc, session.tracker.run_id))
            raise
        except SystemExit as exc:  # the user's code exited: the job did not end, it failed
            error = UserCodeError(code_exited(exc))
            _end(session, "FAILED", str(error))
            raise error from exc
        except BaseException as exc:
            _end(session, "FAILED", f"{type(exc).__name__}: {exc}")
            raise
        _end(session, "FINISHED", None)


def stop_note(exc: Preempted, run_id: str) -> str:
    """What error.txt says of a stop: how to continue, or that there is nothing to continue from."""
    if exc.checkpoint_logged:
        return f"{exc}; continue it with resume={run_id}"
    return f"{exc} before its first epoch ended: there is no checkpoint to resume from; rerun it"


def _end(session: Session, status: str, error: str | None) -> None:
    if session.heartbeat is not None:
        session.heartbeat.stop()
    session.tracker.end(status, error=error)


def _wants_gpu(cfg: JobConfig) -> bool:
    import torch  # the job has it loaded by now; this module stays importable without paying for it

    return cfg.accelerator == "gpu" or (cfg.accelerator == "auto" and torch.cuda.is_available())


# --- rank 0 ----------------------------------------------------------------------------------------------------


def _open_zero(start: Start, workdir: Path, here: ranks.Place) -> Session:
    """Build the task, attach to the run, record the configuration; hand the others what they need. A mistake here
    is handed to them too, so that they stop instead of waiting for rank 0."""
    try:
        session = _attach(start, workdir, here)
    except SystemExit as exc:  # the user's code exited as it was imported or built
        error = UserCodeError(code_exited(exc))
        ranks.share({"error": str(error)}, here)
        raise error from exc
    except BaseException as exc:
        ranks.share({"error": str(exc)}, here)
        raise
    resume = session.resume
    shared: dict[str, object] = {"config": session.cfg.as_params(), "run_id": session.tracker.run_id}
    if resume is not None and here.world > 1:
        shared["resume"] = {"checkpoint": resume.checkpoint.read_bytes(), "lr": resume.lr, "source": resume.source}
    ranks.share(shared, here)
    return session


def _attach(start: Start, workdir: Path, here: ranks.Place) -> Session:
    cfg, experiment_name, parent_run = start.cfg, start.experiment_name, start.parent_run
    configure_client()
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    stores.probe(uri)  # before the data: a tracking URI that cannot work is the first thing to say
    run_id = os.environ.get("MLFLOW_RUN_ID", "")
    if not (run_id or cfg.resume or parent_run):
        stores.check_experiment(uri, experiment_name)
    new_job = None if cfg.resume else task.build(cfg)  # a model or dataset that cannot be built fails before any run
    checkpoint = ownership.claim(uri, cfg.resume, workdir / "resume") if cfg.resume else None
    if run_id and not cfg.resume:
        _check_attachable(uri, run_id)
    tracker = RunTracker.open(uri, cfg.resume or run_id, experiment_name, parent_run, cfg.system_metrics)
    heartbeat = Heartbeat(tracker.run.client, tracker.run_id)
    if new_job is None:
        assert checkpoint is not None  # a resume: claimed with its checkpoint
        cfg, resume = _resumed(tracker.reader, workdir, checkpoint)
        tracker.set_tags({"resumed": "true"})  # params are write-once: its resume param keeps the first start's value
        job = task.build(cfg)
    else:
        job, resume = new_job, None
        if cfg.run_name or not run_id or MLFLOW_RANDOM_NAME.fullmatch(tracker.reader.get().tags.get(RUN_NAME_TAG, "")):
            tracker.set_tags({RUN_NAME_TAG: cfg.run_name or default_name(cfg, start.entry, job.own_lr)})
        resolved = job.resolved(cfg)
        runconfig.log_config(tracker, resolved, start.entry)
        # Under `mlflow run` MLflow logged every parameter's command-line value first (params are write-once): what
        # a config file set, and what the job resolved otherwise, are tags beside them.
        tracker.set_tags({f"config.{k}": cfg.as_params()[k] for k in start.from_file})
        tracker.set_tags({f"resolved.{k}": v for k, v in runconfig.changed(cfg, resolved).items()})
        cfg = resolved
    commit = git_commit(Path(__file__).parent)  # `mlflow run` tags its own as mlflow.source.git.commit
    if commit:
        tracker.set_tags({"git_commit": commit})
    return Session(cfg, job, tracker, workdir, resume, here, reader=tracker.reader, heartbeat=heartbeat)


def _resumed(reader: RunReader, workdir: Path, checkpoint: Path) -> tuple[JobConfig, Resume]:
    """A resumed run's configuration, its checkpoint (downloaded and checked by the claim) and its LR choice."""
    cfg = runconfig.resumed_config(reader, workdir)
    params = reader.get().params
    return cfg, Resume(checkpoint, float(params["lr_used"]), params["lr_source"])


def default_name(cfg: JobConfig, entry: str, own_lr: float | None = None) -> str:
    """What the run is: lenet-adam-finder, resnet18-sgd-lr=0.01, TabularRegressor-finder, lenet-adam-study,
    TabularRegressor-own-lr (its own LR, unknown before the fit)."""
    parts = [cfg.model.rsplit(".", 1)[-1]] + ([] if cfg.user_module else [cfg.optimizer])
    if entry in ("compare", "lr-find"):
        return "-".join([*parts, "study" if entry == "compare" else "lr-find"])
    lr = cfg.lr or own_lr
    return "-".join([*parts, "finder" if cfg.auto_lr else f"lr={lr:g}" if lr else "own-lr"])


def _check_attachable(uri: str, run_id: str) -> None:
    """MLFLOW_RUN_ID names the run to write to: `mlflow run`'s (running); never one that already ended."""
    status = ownership.fetch(uri, run_id).info.status
    if status != "RUNNING":
        raise ConfigError(
            "MLFLOW_RUN_ID", run_id, f"a running run (it is {status}): unset it, or resume it with resume="
        )


# --- the other ranks -------------------------------------------------------------------------------------------


def _open_other(workdir: Path, here: ranks.Place) -> Session:
    """Rank 0's configuration and resume state; a mistake rank 0 met stops this rank too, quietly."""
    logging.getLogger("mlproject").setLevel(logging.WARNING)  # rank 0 speaks for the job
    shared = ranks.share(None, here)
    if "error" in shared:
        raise RankStopped()
    cfg = JobConfig.from_params(shared["config"])
    resume = None
    if "resume" in shared:
        state = shared["resume"]
        checkpoint = workdir / "resume" / "last.ckpt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(state["checkpoint"])
        resume = Resume(checkpoint, state["lr"], state["source"])
    return Session(cfg, task.build(cfg), NullTracker(), workdir, resume, here)


def check_world(cfg: JobConfig, here: ranks.Place) -> None:
    """The launcher's processes and the job's devices x num_nodes must agree, or Lightning would hang or refuse."""
    if here.world == 1 and cfg.num_nodes > 1:
        raise ConfigError("num_nodes", cfg.num_nodes, "1 without a launcher: start every node with torchrun or srun")
    if here.world > 1 and here.world != cfg.devices * cfg.num_nodes:
        accepted = f"devices x num_nodes = the launcher's {here.world} processes (num_nodes {cfg.num_nodes})"
        raise ConfigError("devices", cfg.devices, accepted)


# --- several devices on this machine: the supervisor ---------------------------------------------------------------


def supervise(cfg: JobConfig, experiment_name: str, argv: list[str]) -> int:
    """The job as torchrun's launcher: its names checked, its run created (or `mlflow run`'s taken) and handed to the
    workers, and a run that lost a worker recorded FAILED; returns the job's exit code."""
    task.check(cfg)  # a mistake in the names fails before any process starts
    configure_client()
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    stores.probe(uri)
    run_id = cfg.resume or os.environ.get("MLFLOW_RUN_ID") or stores.create_run(uri, experiment_name)
    log.info("run %s on %s: %d processes (torchrun)", run_id, redact(uri) or "the local store", cfg.devices)
    # The CPU share divided among the workers (torchrun would give each one thread, and say so at length).
    shared = threads.for_children(cfg.devices, "DDP ranks")
    outcome = launch.run_workers(cfg.devices, argv, {**os.environ, **shared, "MLFLOW_RUN_ID": run_id})
    if outcome.lost() or stores.run_status(uri, run_id) == "RUNNING":
        stores.fail_run(uri, run_id, launch.lost_reason(outcome))
    return outcome.exit_code()
