"""One job's flow, as named steps: choose the LR -> prepare the module -> fit and test -> record the results -> log
the model. Every write goes through the session's tracker; every decision lives in the module that owns it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mlproject import progress
from mlproject.errors import Preempted, TrainingDiverged
from mlproject.finder import choose
from mlproject.finder.result import LRChoice
from mlproject.record.payload import batch_input, model_payload
from mlproject.session import Session
from mlproject.training import optimizers, runtime, trainer
from mlproject.training.runtime import Runtime
from mlproject.training.sources import Loaders

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    choice: LRChoice
    final: dict[str, float]  # final_<validation value> and the test values
    history: list[dict[str, float]]  # per-epoch values of this process's epochs


def lr_find(session: Session) -> LRChoice:
    """The `lr_find` entry point: the range test alone."""
    return choose.choose_lr(session.cfg, session.job, describe_runtime(session), session.tracker)


def run(session: Session, forced: LRChoice | None = None) -> JobResult:
    """The `main` entry point: choose the LR (the range test when auto_lr), fit, test, record; a study's finder member
    trains at its parent's range test's answer (`forced`)."""
    rt = describe_runtime(session)
    choice = choose_lr(session, rt, forced)
    module = prepare_module(session, rt, choice)
    fitted = fit(session, rt, module)
    final = record_results(session, fitted)
    if session.here.zero:
        log_model(session, module, choice, final)
    return JobResult(choice, final, fitted.history)


def describe_runtime(session: Session) -> Runtime:
    """What to run on; the run is tagged with it and with what it trains."""
    rt = runtime.detect_runtime(session.cfg)
    session.tracker.set_tags(runtime.tags(rt, session.job.lightning))
    return rt


def choose_lr(session: Session, rt: Runtime, forced: LRChoice | None) -> LRChoice:
    """A resumed run's own choice (recorded when it started); else, with the datasets recorded, the study's (forced),
    the finder's (auto_lr) or cfg.lr."""
    cfg, job, tracker, resume = session.cfg, session.job, session.tracker, session.resume
    if resume is not None:
        return LRChoice(resume.lr, resume.source)
    for item in job.data.inputs:
        tracker.log_dataset(item)
    if forced is not None:
        choice = forced
    elif cfg.auto_lr:
        choice = choose.choose_lr(cfg, job, rt, tracker)
    else:
        choice = LRChoice(cfg.lr, "fixed")
    tracker.log_params({"lr_used": f"{choice.lr:.6g}", "lr_source": choice.source})
    return choice


def prepare_module(session: Session, rt: Runtime, choice: LRChoice) -> Any:
    """A fresh module under the job's seed (the range test's copy started from the same weights), at the chosen LR
    and under the schedule cfg resolves to."""
    cfg, job = session.cfg, session.job
    module = job.module(cfg.seed, rt.channels_last)
    optimizers.set_lr(job.lightning, module, job.lr_attr, choice.lr)
    optimizers.apply_schedule(module, cfg.resolved_schedule, choice.lr, choice.lr_low)
    if cfg.compile and hasattr(module, "compile_net"):
        module.compile_net()
    return module


def fit(session: Session, rt: Runtime, module: Any) -> trainer.FitResult:
    """Fit and test; every epoch's values go to the run as they come, its checkpoint to the run's artifacts. A
    resumed session continues from its run's checkpoint."""
    cfg, job, tracker, resume = session.cfg, session.job, session.tracker, session.resume
    lines = progress.EpochLines(cfg.epochs, session.show == "lines")

    def sink(epoch: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics(metrics, step=epoch)
        lines(epoch, metrics)

    def keep(path: Any) -> None:
        tracker.log_files({"last.ckpt": path.read_bytes()}, "checkpoints")

    checkpoint = session.workdir / "last.ckpt"
    try:
        return trainer.fit_and_test(
            job.lightning,
            module,
            job.data.loaders(cfg.seed, rt.device.type),
            rt,
            epochs=cfg.epochs,
            sink=sink,
            checkpoint=checkpoint,
            keep=keep,
            resume_from=resume.checkpoint if resume else None,
            bar=session.show == "bar",
        )
    except (TrainingDiverged, Preempted) as exc:
        # The run holds the last epoch that ended with a finite loss (or a resumed run its earlier one).
        exc.checkpoint_logged = checkpoint.exists() or resume is not None
        raise


def record_results(session: Session, fitted: trainer.FitResult) -> dict[str, float]:
    """The test values as metrics at the last step; the last validation's (final_<name>) and the test values as
    params, where a study ranks its members by them."""
    final = {f"final_{k}": v for k, v in fitted.validation.items()} | fitted.test
    session.tracker.log_metrics(fitted.test, step=session.cfg.epochs)
    session.tracker.log_params({k: f"{v:.4f}" for k, v in final.items()})
    return final


def log_model(session: Session, module: Any, choice: LRChoice, final: dict[str, float]) -> None:
    """The trained model with a real batch's signature; registered under register_model, its version tagged with
    the LR and the final figures."""
    cfg, job, tracker = session.cfg, session.job, session.tracker
    example = job.data.example() if job.data.example else batch_input(first_batch(job.data.loaders(cfg.seed, "cpu")))
    model_uri = tracker.log_model(model_payload(module, not job.user_module, example), cfg.code)
    if cfg.register_model:
        tags = {"lr_source": choice.source, "lr_used": f"{choice.lr:.6g}"} | {k: f"{v:.4f}" for k, v in final.items()}
        version = tracker.register(cfg.register_model, model_uri, tags)
        log.info("registered the model as %s version %s", cfg.register_model, version)


def first_batch(loaders: Loaders) -> Any:
    """A real batch for the signature: the data module's validation (or training) loader's first."""
    source = loaders.datamodule
    if source is None:
        return None
    for hook in ("val_dataloader", "train_dataloader"):
        try:
            return next(iter(getattr(source, hook)()))
        except Exception:  # a loader that needs the Trainer, or none defined: try the next, else no signature
            continue
    return None
