"""One job's flow: resolve the task -> range test -> fit -> test -> log, as the README's "What a run contains"
lists it. Every write goes through the Tracker; every decision lives in the module that owns it."""

from __future__ import annotations

import json
import logging
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlproject import artifacts, lr_range, progress, sources, sweep, training, verify
from mlproject.artifacts import RangeTest
from mlproject.config import JobConfig
from mlproject.errors import Preempted, TrainingDiverged
from mlproject.session import Session
from mlproject.task import Task
from mlproject.tracking import MLFLOW_VERSION, Tracker

log = logging.getLogger(__name__)
SPREAD_WARNING = 0.3  # decades between repeated range tests beyond which the suggestion is called uncertain


@dataclass(frozen=True)
class LRChoice:
    lr: float  # the LR the fit uses (the one-cycle peak when the schedule is onecycle)
    source: str  # finder, verified, fixed or fallback
    lr_low: float = 0.0  # the one-cycle start; 0 = the schedule's default
    found: RangeTest | None = None
    verified: verify.Verification | None = None


@dataclass(frozen=True)
class JobResult:
    choice: LRChoice
    final: dict[str, float]  # final_<validation value> and the test values
    history: list[dict[str, float]]  # per-epoch values of this process's epochs


def seeded_module(cfg: JobConfig, job: Task, rt: training.Runtime) -> Any:
    """A fresh module under the job's seed: the sweep's copy and the fit start from the same weights."""
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    return job.make_module(rt.channels_last)


def fit_steps(cfg: JobConfig, job: Task, rt: training.Runtime, batches_per_epoch: int = 0) -> int:
    """Optimizer steps of the fit on each rank: what the combined rule weighs (and the one-cycle's length)."""
    per_epoch = job.steps_per_epoch(rt.world_size) or batches_per_epoch
    return cfg.epochs * per_epoch


def one_sweep(cfg: JobConfig, job: Task, rt: training.Runtime, stop_early: bool = True) -> RangeTest:
    """One range test; with lr_probe the suggestion comes from the held-out probe's curve."""
    progress.sweep_start(cfg.lr_min, cfg.lr_max, cfg.lr_steps, shown=True)
    module = seeded_module(cfg, job, rt)
    probe = job.probe(rt.device) if cfg.lr_probe and job.probe else None
    inputs = job.loaders(cfg.seed + 1, rt.device.type).sweep_kwargs()
    curve = sweep.range_test(module, inputs, lightning=job.lightning, rt=rt, lr_min=cfg.lr_min, lr_max=cfg.lr_max,
                             steps=cfg.lr_steps, probe=probe, stop_early=stop_early)  # fmt: skip
    steps = fit_steps(cfg, job, rt, curve.batches_per_epoch)
    losses = curve.probe_losses if cfg.lr_probe else curve.losses
    found = lr_range.suggest(curve.lrs, losses, cfg.lr_method, cfg.lr, steps)
    found = lr_range.guard_edge(found, curve.lrs, losses, curve.steps_run == curve.steps_requested)
    if found.confidence == 0.0 and found.method != "fallback":
        log.warning("range test: %s", found.reason)
    return RangeTest(curve, found, (found.lr,), 0.0, steps)


def find_lr(cfg: JobConfig, job: Task, rt: training.Runtime, tracker: Tracker) -> LRChoice:
    """Sweep (lr_repeats times), suggest, log the curve; no usable sweep falls back to cfg.lr, reason recorded."""
    sweeps = [one_sweep(cfg.replace(seed=cfg.seed + r), job, rt) for r in range(cfg.lr_repeats)]
    answered = [s for s in sweeps if s.suggestion.method != "fallback"] or sweeps
    ranked = sorted(answered, key=lambda s: s.suggestion.lr)
    median = ranked[(len(ranked) - 1) // 2]  # the median repeat: its curve is the one plotted
    spread = spread_decades([s.suggestion.lr for s in answered])
    if spread > SPREAD_WARNING:
        log.warning("the %d range tests disagree by %.2f decades: the suggestion is uncertain", len(sweeps), spread)
    found = RangeTest(median.curve, median.suggestion, tuple(s.repeat_suggestions[0] for s in sweeps), spread,
                      median.fit_steps)  # fmt: skip
    source = "fallback" if found.suggestion.method == "fallback" else "finder"
    s = found.suggestion
    curve = found.curve
    stop = f"stopped: {curve.stop_reason}" if curve.stop_reason else "ran to lr_max"
    log.info("range test: %d of %d steps in %.2f s (%s); %s lr=%.4g (%s)", curve.steps_run, curve.steps_requested,
             curve.seconds, stop, source, s.lr, s.reason)  # fmt: skip
    checked = verify.verify(cfg, job, rt, found, seeded_module)
    s, source = (checked.suggestion or s, "verified") if checked.ran else (s, source)
    onecycle = cfg.resolved_schedule == "onecycle"
    choice = LRChoice(s.lr_high if onecycle else s.lr, source, s.lr_low if onecycle and source != "fallback" else 0.0,
                      found, checked)  # fmt: skip
    log_range_test(cfg, tracker, choice, job)
    return choice


def spread_decades(lrs: list[float]) -> float:
    """Decades between the largest and the smallest suggestion (0 for a single sweep)."""
    logs = [math.log10(lr) for lr in lrs if lr > 0]
    return max(logs) - min(logs) if logs else 0.0


def log_range_test(cfg: JobConfig, tracker: Tracker, choice: LRChoice, job: Task) -> None:
    found = choice.found
    assert found is not None
    extra: dict[str, object] = {
        "batch_size": cfg.batch_size,
        "effective_batch_size": cfg.batch_size * found.curve.world_size,
    }
    if cfg.lr_probe:  # what the training-loss curve alone would have said, for comparison
        extra["signal"] = "validation probe"
        curve = found.curve
        extra["train_curve_suggestion"] = lr_range.suggest(curve.lrs, curve.losses, cfg.lr_method, cfg.lr,
                                                           found.fit_steps).lr  # fmt: skip
    checked = choice.verified
    files: dict[str, bytes | str] = {
        "curve.csv": artifacts.curve_csv(found.curve),
        "loss_vs_lr.png": artifacts.plot(found, choice.lr, checked, cfg.monitor),
    }
    if checked is not None and checked.trials:
        files["verify.csv"] = artifacts.verify_csv(checked, cfg.monitor)
    tracker.log_files(files, "lr_find")
    if checked is not None:
        extra["verify"] = artifacts.verify_summary(checked)
    tracker.log_json("summary.json", artifacts.summary(found, extra), "lr_find")
    verified = f"{checked.lr:.6g}" if checked is not None and checked.lr else "skipped"  # why: summary.json
    tracker.log_params({"lr_suggested": f"{found.suggestion.lr:.6g}", "lr_verified": verified})
    tracker.log_metrics(
        {
            "lr_suggested": found.suggestion.lr,
            "lr_find_seconds": found.curve.seconds,
            "lr_verify_seconds": checked.seconds if checked is not None else 0.0,
        }  # fmt: skip
        | ({"lr_spread": found.spread_decades} if len(found.repeat_suggestions) > 1 else {})
    )
    tracker.log_metric_series(artifacts.curve_metrics(found.curve))


def system_tags(rt: training.Runtime, job: Task) -> dict[str, str]:
    device = torch.cuda.get_device_name(0) if rt.accelerator == "gpu" else _cpu_model()
    return {
        "torch_version": torch.__version__,
        "lightning_version": job.lightning.pl.__version__,
        "lightning_package": job.lightning.name,
        "mlflow_version": MLFLOW_VERSION,
        "device": device,
        "precision": rt.precision,
        "world_size": str(rt.world_size),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime(cfg: JobConfig, job: Task, tracker: Tracker) -> training.Runtime:
    """What to run on; the run is tagged with it and with what it trains."""
    rt = training.detect_runtime(cfg)
    tracker.set_tags(system_tags(rt, job))
    return rt


def lr_find(session: Session) -> LRChoice:
    """The `lr_find` entry point: the range test alone."""
    cfg, job, tracker = session.cfg, session.job, session.tracker
    return find_lr(cfg, job, runtime(cfg, job, tracker), tracker)


def run(session: Session, forced: LRChoice | None = None) -> JobResult:
    """The `main` entry point: range test (when auto_lr), fit, test; everything logged to the session's tracker.

    A resumed session continues from its run's own checkpoint and LR choice instead of a new range test; a study's
    finder member trains at its parent's range test's answer (`forced`).
    """
    cfg, job, tracker, resume = session.cfg, session.job, session.tracker, session.resume
    rt = runtime(cfg, job, tracker)
    if resume is not None:
        choice = LRChoice(resume.lr, resume.source)
    elif forced is not None:
        for item in job.inputs:
            tracker.log_dataset(item)
        choice = forced
        tracker.log_params({"lr_used": f"{choice.lr:.6g}", "lr_source": choice.source})
    else:
        for item in job.inputs:
            tracker.log_dataset(item)
        choice = find_lr(cfg, job, rt, tracker) if cfg.auto_lr else LRChoice(cfg.lr, "fixed")
        tracker.log_params({"lr_used": f"{choice.lr:.6g}", "lr_source": choice.source})

    module = seeded_module(cfg, job, rt)
    training.set_lr(job.lightning, module, job.lr_attr, choice.lr)
    training.apply_schedule(module, cfg.resolved_schedule, choice.lr, choice.lr_low)
    if cfg.compile and hasattr(module, "compile_net"):
        module.compile_net()
    loaders = job.loaders(cfg.seed, rt.device.type)
    lines = progress.EpochLines(cfg.epochs, session.show == "lines")

    def sink(epoch: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics(metrics, step=epoch)
        lines(epoch, metrics)

    keep = lambda path: tracker.log_files({"last.ckpt": path.read_bytes()}, "checkpoints")  # noqa: E731
    checkpoint = session.workdir / "last.ckpt"
    resume_from = resume.checkpoint if resume is not None else None
    try:
        result = training.fit_and_test(
            job.lightning, module, loaders, rt, epochs=cfg.epochs, sink=sink, checkpoint=checkpoint, keep=keep,
            resume_from=resume_from, bar=session.show == "bar",
        )  # fmt: skip
    except (TrainingDiverged, Preempted) as exc:
        # The run holds the last epoch that ended with a finite loss (or a resumed run its earlier one).
        exc.checkpoint_logged = checkpoint.exists() or resume is not None
        raise
    final = {f"final_{k}": v for k, v in result.validation.items()} | result.test
    tracker.log_metrics(result.test, step=cfg.epochs)
    tracker.log_params({k: f"{v:.4f}" for k, v in final.items()})
    if session.here.zero:
        example = job.example() if job.example else artifacts.batch_input(_first_batch(loaders))
        model_uri = tracker.log_model(artifacts.model_payload(module, not job.user_module, example), cfg.code)
        if cfg.register_model:
            tags = {"lr_source": choice.source, "lr_used": f"{choice.lr:.6g}"} | {
                k: f"{v:.4f}" for k, v in final.items()
            }
            version = tracker.register(cfg.register_model, model_uri, tags)
            log.info("registered the model as %s version %s", cfg.register_model, version)
    return JobResult(choice, final, result.history)


def _first_batch(loaders: sources.Loaders) -> Any:
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


def log_config(tracker: Tracker, cfg: JobConfig, entry: str) -> None:
    """Every parameter as a param, and the resolved configuration as config.json (what resume reads back)."""
    tracker.log_params(cfg.as_params())
    tracker.log_json("config.json", {"entry_point": entry, **cfg.as_params()})


def resumed_config(tracker: Tracker, workdir: Path) -> JobConfig:
    """The configuration the run started with (its config.json), marked as resumed."""
    params = json.loads(tracker.download("config.json", workdir).read_text())
    return JobConfig.from_params(params).replace(resume=tracker.run_id)
