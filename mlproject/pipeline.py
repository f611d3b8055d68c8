"""One job's flow, as named steps: choose the LR -> prepare the module -> fit and test -> record the results -> log
the model. Every write goes through the session's tracker; every decision lives in the module that owns it."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

from mlproject import progress
from mlproject.config import LR_FREE, JobConfig
from mlproject.errors import Preempted, TrainingDiverged
from mlproject.finder import choose
from mlproject.finder.result import LR_FREE_SOURCE, OWN_LR, LRChoice
from mlproject.record.payload import batch_input, model_payload
from mlproject.session import Session
from mlproject.training import optimizers, runtime, trainer
from mlproject.training.optimizers import same_lr, unreached
from mlproject.training.runtime import Runtime
from mlproject.training.sources import DataSource, Loaders

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
    fitted = fit(session, rt, module, choice)
    applied = replace(choice, lr=fitted.lr)
    final = record_results(session, fitted)
    if session.here.zero:
        log_model(session, module, applied, final)
    return JobResult(applied, final, fitted.history)


def describe_runtime(session: Session) -> Runtime:
    """What to run on; the run is tagged with it and with what it trains."""
    rt = runtime.detect_runtime(session.cfg)
    session.tracker.set_tags(runtime.tags(rt, session.job.lightning))
    return rt


def choose_lr(session: Session, rt: Runtime, forced: LRChoice | None) -> LRChoice:
    """A resumed run's own choice (recorded when it started); else, with the datasets recorded, the study's (forced),
    an LR-free optimizer's (no range test), the finder's (auto_lr), lr as given, or the model's own (lr=0: the module
    keeps the LR it builds at)."""
    cfg, job, tracker, resume = session.cfg, session.job, session.tracker, session.resume
    if resume is not None:
        return LRChoice(resume.lr, resume.source)
    for item in job.data.inputs:
        tracker.log_dataset(item)
    if forced is not None:
        return forced
    if cfg.optimizer in LR_FREE:  # no range test: lr (its multiplier, for Prodigy) as given, or its authors' default
        return LRChoice(cfg.lr or LR_FREE[cfg.optimizer], LR_FREE_SOURCE)
    if cfg.auto_lr:
        return choose.choose_lr(cfg, job, rt, tracker)
    if cfg.lr > 0:
        return LRChoice(cfg.lr, "fixed")
    return LRChoice(job.own_lr if job.own_lr is not None else math.nan, OWN_LR)  # nan: read back at the fit's start


def prepare_module(session: Session, rt: Runtime, choice: LRChoice) -> Any:
    """A fresh module under the job's seed (the range test's copy started from the same weights), at the chosen LR
    and under the schedule cfg resolves to."""
    cfg, job = session.cfg, session.job
    module = job.module(cfg.seed, rt.channels_last)
    if choice.source != OWN_LR:
        job.set_lr(module, choice.lr)
    optimizers.apply_schedule(module, cfg.resolved_schedule, choice.lr, choice.lr_low)
    if cfg.compile and hasattr(module, "compile_net"):
        module.compile_net()
    return module


def fit(session: Session, rt: Runtime, module: Any, choice: LRChoice) -> trainer.FitResult:
    """Fit and test; every epoch's values go to the run as they come, its checkpoint to the run's artifacts. Before
    the first step, the LR the optimizers were built at is read back from them: recorded as lr_used, and the fit
    stops there if it is not the LR chosen. A resumed session continues from its run's checkpoint."""
    cfg, job, tracker, resume = session.cfg, session.job, session.tracker, session.resume
    lines = progress.EpochLines(cfg.epochs, session.show == "lines")

    def built(lr: float) -> None:
        if choice.source != OWN_LR and not same_lr(lr, choice.lr):
            raise unreached(type(module).__qualname__, job.lr_target, choice.lr, lr)
        if resume is None:  # a resumed run recorded its LR when it started
            tracker.log_params({"lr_used": f"{lr:.6g}", "lr_source": choice.source})

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
            built=built,
            resume_from=resume.checkpoint if resume else None,
            bar=session.show == "bar",
            extra=job.callbacks(),
            trainer_args=job.trainer_args,
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
    session.tracker.set_tags(applied_tags(session.cfg, session.job.data, fitted.batch_size))
    if fitted.optimizer:
        session.tracker.set_tags({"optimizer_class": fitted.optimizer})
    return final


def applied_tags(cfg: JobConfig, data: DataSource, served: int | None) -> dict[str, str]:
    """What of batch_size and train_subset the data really applied, said where it differs from what was asked: a
    user's data module (or a module's own loaders) batches and subsets its data itself."""
    tags = {}
    if served is not None and served != cfg.batch_size:
        why = "the training loader served batches of %d (set it in the data module's own arguments, dataset_args)"
        asked = cfg.batch_size != JobConfig().batch_size  # else the default, which the user may never have named
        level = logging.WARNING if asked else logging.INFO
        log.log(level, "batch_size=%d was not applied: " + why, cfg.batch_size, served)
        tags["applied.batch_size"] = str(served)
    if cfg.train_subset and not data.subsets:
        log.warning("train_subset=%d was not applied: the data module serves all its data", cfg.train_subset)
        tags["applied.train_subset"] = "0"
    return tags


def log_model(session: Session, module: Any, choice: LRChoice, final: dict[str, float]) -> None:
    """The trained model with a real batch's signature; registered under register_model, its version tagged with
    the LR and the final figures."""
    cfg, job, tracker = session.cfg, session.job, session.tracker
    loaders = job.data.loaders(cfg.seed, "cpu")
    example = job.data.example() if job.data.example else batch_input(first_batch(loaders, module))
    model_uri = tracker.log_model(model_payload(module, not job.user_module, example), cfg.code)
    if cfg.register_model:
        tags = {"lr_source": choice.source, "lr_used": f"{choice.lr:.6g}"} | {k: f"{v:.4f}" for k, v in final.items()}
        version = tracker.register(cfg.register_model, model_uri, tags)
        log.info("registered the model as %s version %s", cfg.register_model, version)


def first_batch(loaders: Loaders, module: Any) -> Any:
    """A real batch for the signature: the validation (or training) loader's first, of the data module or of the
    module itself when it brings its own."""
    source = module if loaders.own else loaders.datamodule
    if source is None:
        return None
    for hook in ("val_dataloader", "train_dataloader"):
        try:
            return next(iter(getattr(source, hook)()))
        except Exception:  # a loader that needs the Trainer, or none defined: try the next, else no signature
            continue
    return None
