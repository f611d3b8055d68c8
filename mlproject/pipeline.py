"""One job: seed -> data -> range test -> fit -> test -> log, as the README's "What a run contains" lists it."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from mlproject import data, lr_range, plots, sweep, training
from mlproject.config import CHECKPOINT_ARTIFACT, JobConfig
from mlproject.errors import Preempted, TrainingDiverged
from mlproject.model import NETS, Classifier, OptimSpec
from mlproject.tracking import MLFLOW_VERSION, Tracker

log = logging.getLogger(__name__)
SPREAD_WARNING = 0.3  # decades between repeated range tests beyond which the suggestion is called uncertain


@dataclass(frozen=True)
class LRChoice:
    lr: float  # the LR the fit uses (the one-cycle peak when schedule=onecycle)
    source: str  # finder, fixed or fallback
    lr_low: float = 0.0  # the one-cycle start; 0 = the schedule's default
    suggestion: lr_range.Suggestion | None = None
    curve: sweep.LRCurve | None = None


@dataclass(frozen=True)
class JobResult:
    choice: LRChoice
    final: dict[str, float]
    history: list[dict[str, float]]  # per-epoch metrics of this process's epochs


def load_data(cfg: JobConfig, source: data.Source) -> data.Dataset:
    return data.load(cfg.dataset, source, cfg.val_size, cfg.train_subset, cfg.seed)


def build_classifier(cfg: JobConfig, rt: training.Runtime, optim: OptimSpec) -> Classifier:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    return Classifier(NETS[cfg.model](), optim, channels_last=rt.channels_last)


def find_lr(cfg: JobConfig, ds: data.Dataset, rt: training.Runtime, tracker: Tracker) -> LRChoice:
    """Sweep (lr_repeats times), suggest, log the curve; no usable sweep falls back to cfg.lr, reason recorded."""
    sweeps = [one_sweep(cfg.replace(seed=cfg.seed + r), ds, rt) for r in range(cfg.lr_repeats)]
    answered = [s for s in sweeps if s[1].method != "fallback"] or sweeps
    ranked = sorted(answered, key=lambda s: float(s[1].lr or 0))
    curve, found = ranked[(len(ranked) - 1) // 2]  # the median repeat: its curve is the one plotted
    spread = spread_decades([float(s[1].lr or 0) for s in answered])
    if spread > SPREAD_WARNING:
        log.warning("the %d range tests disagree by %.2f decades: the suggestion is uncertain", len(sweeps), spread)
    source = "fallback" if found.method == "fallback" else "finder"
    log.info("range test: %d steps in %.2fs; %s lr=%.4g (%s)", curve.steps_run, curve.seconds, source, found.lr,
             found.reason)  # fmt: skip
    steps = fit_steps(cfg, ds)
    extra = {
        "fit_steps": steps,  # the length of fit the combined rule weighed
        "repeats": len(sweeps),
        "repeat_suggestions": [s[1].lr for s in sweeps],
        "spread_decades": spread,
    }
    if cfg.lr_probe:  # what the training-loss curve alone would have said, for comparison
        extra["signal"] = "validation probe"
        extra["train_curve_suggestion"] = lr_range.suggest(curve.lrs, curve.losses, cfg.lr_method, cfg.lr, steps).lr
    log_range_test(tracker, curve, found, extra)
    assert found.lr is not None  # suggest() always answers
    peak = found.lr_high if cfg.schedule == "onecycle" else found.lr
    low = found.lr_low if cfg.schedule == "onecycle" and source == "finder" else 0.0
    return LRChoice(peak, source, low, found, curve)


def one_sweep(
    cfg: JobConfig, ds: data.Dataset, rt: training.Runtime, stop_early: bool = True
) -> tuple[sweep.LRCurve, lr_range.Suggestion]:
    """One range test; with lr_probe the suggestion comes from the held-out probe's curve."""
    model = build_classifier(cfg, rt, OptimSpec(cfg.optimizer, cfg.lr_min))
    train = training.batches(ds.train, ds, rt, cfg.batch_size, shuffle=True, seed=cfg.seed + 1)
    probe = probe_batch(ds, rt) if cfg.lr_probe else None
    curve = sweep.range_test(model, train, rt, cfg.lr_min, cfg.lr_max, cfg.lr_steps, probe, stop_early)
    losses = curve.probe_losses if cfg.lr_probe else curve.losses
    return curve, lr_range.suggest(curve.lrs, losses, cfg.lr_method, cfg.lr, fit_steps(cfg, ds))


def fit_steps(cfg: JobConfig, ds: data.Dataset) -> int:
    """Optimizer steps of the fit: the one-cycle schedule's length, and what the combined rule weighs."""
    return cfg.epochs * math.ceil(len(ds.train) / cfg.batch_size)


PROBE_SIZE = 1024  # held-out samples the probe scores after every sweep step: ~1/5 of a validation pass


def probe_batch(ds: data.Dataset, rt: training.Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = ds.val.images[:PROBE_SIZE], ds.val.labels[:PROBE_SIZE]
    return data.normalize(images.to(rt.device), ds.mean, ds.std), labels.to(rt.device)


def spread_decades(lrs: list[float]) -> float:
    """Decades between the largest and the smallest suggestion (0 for a single sweep)."""
    logs = [math.log10(lr) for lr in lrs if lr > 0]
    return max(logs) - min(logs) if logs else 0.0


def log_range_test(
    tracker: Tracker, curve: sweep.LRCurve, found: lr_range.Suggestion, extra: dict[str, object]
) -> None:
    usable = lr_range.usable_curve(curve.lrs, curve.losses)
    smoothed = usable.smoothed.tolist()
    summary = {
        "suggestion": found.lr,
        "method": found.method,
        "confidence": round(found.confidence, 3),
        "reason": found.reason,
        "fallback_reason": found.reason if found.method == "fallback" else None,
        "candidates": found.candidates,
        "lr_low": found.lr_low,
        "lr_high": found.lr_high,
        "lr_min": curve.lr_min,
        "lr_max": curve.lr_max,
        "steps_requested": curve.steps_requested,
        "steps_run": curve.steps_run,
        "stopped_on_divergence": curve.stopped_early or bool(usable.reason),
        "divergence": usable.reason or None,
        "stop_reason": curve.stop_reason or ("Lightning's stop at 4x its best loss" if curve.stopped_early else None),
        "seconds": round(curve.seconds, 3),
        **extra,
    }
    png = plots.loss_vs_lr(
        curve.lrs, curve.losses, smoothed, float(found.lr or 0), found.method, found.candidates, curve.probe_losses
    )
    tracker.log_files({"curve.csv": curve_csv(curve, smoothed), "loss_vs_lr.png": png}, "lr_find")
    tracker.log_json("summary.json", summary, "lr_find")
    tracker.log_params({"lr_suggested": f"{found.lr:.6g}"})  # the rule that answered: summary.json's "method"
    spread = float(extra["spread_decades"])  # type: ignore[arg-type]
    tracker.log_metrics({"lr_suggested": float(found.lr or 0), "lr_find_seconds": curve.seconds, "lr_spread": spread})


def curve_csv(curve: sweep.LRCurve, smoothed: list[float]) -> str:
    """step, lr, raw loss, smoothed loss (nan past divergence) and, when probing, the probe's loss."""
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["step", "lr", "loss", "smoothed_loss"] + (["probe_loss"] if curve.probe_losses else []))
    for i, (lr, loss) in enumerate(zip(curve.lrs, curve.losses, strict=True)):
        row = [i, f"{lr:.6g}", f"{loss:.6g}", f"{smoothed[i]:.6g}" if i < len(smoothed) else "nan"]
        writer.writerow(row + ([f"{curve.probe_losses[i]:.6g}"] if curve.probe_losses else []))
    return rows.getvalue()


def system_tags(rt: training.Runtime) -> dict[str, str]:
    device = torch.cuda.get_device_name(0) if rt.accelerator == "gpu" else _cpu_model()
    return {
        "torch_version": torch.__version__,
        "lightning_version": pl.__version__,
        "mlflow_version": MLFLOW_VERSION,
        "device": device,
        "precision": rt.precision,
        "data_mode": rt.data_mode,
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


def lr_find(cfg: JobConfig, source: data.Source, tracker: Tracker) -> LRChoice:
    """The `lr_find` entry point: the range test alone."""
    ds = load_data(cfg, source)
    rt = training.detect_runtime(cfg, ds.train.images.numel())
    tracker.set_tags(system_tags(rt))
    return find_lr(cfg, ds, rt, tracker)


def run(cfg: JobConfig, source: data.Source, tracker: Tracker, workdir: Path) -> JobResult:
    """The `main` entry point: range test (when auto_lr), fit, test; everything logged to `tracker`.

    With cfg.resume, the run's own checkpoint and LR choice are taken instead of a new range test.
    """
    ds = load_data(cfg, source)
    rt = training.detect_runtime(cfg, ds.train.images.numel())
    tracker.set_tags(system_tags(rt))
    resume_from = tracker.download(CHECKPOINT_ARTIFACT, workdir / "resume") if cfg.resume else None
    if cfg.resume:
        choice = resumed_choice(tracker)
    else:
        log_dataset(tracker, ds)
        choice = find_lr(cfg, ds, rt, tracker) if cfg.auto_lr else LRChoice(cfg.lr, "fixed")
        tracker.log_params({"lr_used": f"{choice.lr:.6g}", "lr_source": choice.source})

    train, val, test = fit_batches(cfg, ds, rt)
    total_steps = fit_steps(cfg, ds)
    module = build_classifier(cfg, rt, OptimSpec(cfg.optimizer, choice.lr, cfg.schedule, total_steps, choice.lr_low))
    if cfg.compile:
        module.compile_net()
    sink = lambda epoch, metrics: tracker.log_metrics(metrics, step=epoch)  # noqa: E731
    checkpoint = workdir / "last.ckpt"
    try:
        result = training.fit_and_test(module, train, val, test, rt, cfg.epochs, sink, checkpoint, resume_from)
    except (TrainingDiverged, Preempted):
        if checkpoint.exists():  # the last epoch that ended with a finite loss
            tracker.log_files({"last.ckpt": checkpoint.read_bytes()}, "checkpoints")
        raise

    last = result.history[-1]
    final = {
        "final_val_acc": last["val_acc"],
        "final_val_loss": last["val_loss"],
        "test_acc": result.test["test_acc"],
        "test_loss": result.test["test_loss"],
    }
    tracker.log_metrics({k: final[k] for k in ("test_acc", "test_loss")}, step=cfg.epochs)
    tracker.log_params({k: f"{v:.4f}" for k, v in final.items()})
    log_model(tracker, module, ds)
    return JobResult(choice, final, result.history)


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def fit_batches(cfg: JobConfig, ds: data.Dataset, rt: training.Runtime) -> tuple[Batches, Batches, Batches]:
    """Shuffled training batches (seeded by cfg.seed); validation and test batches in order."""
    train = training.batches(ds.train, ds, rt, cfg.batch_size, shuffle=True, seed=cfg.seed)
    eval_batch = max(cfg.batch_size, 1024)  # evaluation has no gradient: larger batches are simply faster
    val = training.batches(ds.val, ds, rt, eval_batch, shuffle=False, seed=0)
    test = training.batches(ds.test, ds, rt, eval_batch, shuffle=False, seed=0)
    return train, val, test


def log_config(tracker: Tracker, cfg: JobConfig, entry: str) -> None:
    """Every parameter as a param, and the resolved configuration as config.json (what resume reads back)."""
    tracker.log_params(cfg.as_params())
    tracker.log_json("config.json", {"entry_point": entry, **cfg.as_params()})


def resumed_config(tracker: Tracker, workdir: Path) -> JobConfig:
    """The configuration the run started with (its config.json), marked as resumed."""
    params = json.loads(tracker.download("config.json", workdir).read_text())
    return JobConfig.from_params(params).replace(resume=tracker.run_id)


def resumed_choice(tracker: Tracker) -> LRChoice:
    """The LR the interrupted run chose; its schedule's state comes back with the checkpoint."""
    params = tracker.client.get_run(tracker.run_id).data.params
    return LRChoice(float(params["lr_used"]), params["lr_source"])


def log_dataset(tracker: Tracker, ds: data.Dataset) -> None:
    for context, split in (("training", ds.train), ("validation", ds.val), ("test", ds.test)):
        name = f"{ds.name}-{context}"
        tracker.log_dataset(name, split.images.numpy(), split.labels.numpy(), str(ds.source), context)


def log_model(tracker: Tracker, module: Classifier, ds: data.Dataset) -> None:
    net = module.net.to("cpu", memory_format=torch.contiguous_format).eval()
    example = data.normalize(ds.test.images[:2], ds.mean, ds.std).numpy()
    with torch.no_grad():
        output = net(torch.from_numpy(example)).numpy().astype(np.float32)
    tracker.log_model(net, example, output, [f"torch=={torch.__version__.split('+')[0]}"])
