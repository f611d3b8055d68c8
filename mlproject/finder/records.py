"""The range test's records in a run: summary.json, curve.csv, the curve as metrics, loss_vs_lr.png and
verification's table, prepared as data, then written through the tracker."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping

from mlproject import plots
from mlproject.config import JobConfig
from mlproject.finder import rules
from mlproject.finder.result import LRChoice, RangeTest
from mlproject.finder.verify import Verification
from mlproject.record.tracker import Tracker


def record(tracker: Tracker, cfg: JobConfig, choice: LRChoice, train_curve_suggestion: float | None) -> None:
    """Every record of the range test behind `choice`: the artifacts under lr_find/, the suggestion and the
    verified LR as params, the timings, the spread of repeats and the curve as metrics."""
    found, checked = choice.range_test, choice.verification
    assert found is not None, "a choice made without a range test has nothing to record"
    batch = found.curve.batch_size or cfg.batch_size  # as served, where the loader says
    extra: dict[str, object] = {"batch_size": batch, "effective_batch_size": batch * found.curve.world_size}
    if train_curve_suggestion is not None:  # probing: what the training-loss curve alone would have said
        extra |= {"signal": "validation probe", "train_curve_suggestion": train_curve_suggestion}
    files: dict[str, bytes | str] = {
        "curve.csv": curve_csv(found),
        "loss_vs_lr.png": plot(found, choice.lr, checked, cfg.monitor),
    }
    if checked is not None and checked.trials:
        files["verify.csv"] = verify_csv(checked, cfg.monitor)
    tracker.log_files(files, "lr_find")
    if checked is not None:
        extra["verify"] = verify_summary(checked)
    tracker.log_json("summary.json", summary(found, extra), "lr_find")
    verified = f"{checked.lr:.6g}" if checked is not None and checked.lr is not None else "skipped"  # why: summary
    tracker.log_params({"lr_suggested": f"{found.suggestion.lr:.6g}", "lr_verified": verified})
    metrics = {
        "lr_suggested": found.suggestion.lr,
        "lr_find_seconds": found.curve.seconds,
        "lr_verify_seconds": checked.seconds if checked is not None else 0.0,
    }
    if len(found.repeat_suggestions) > 1:
        metrics["lr_spread"] = found.spread_decades
    tracker.log_metrics(metrics)
    tracker.log_metric_series(curve_metrics(found))


def summary(found: RangeTest, extra: Mapping[str, object]) -> dict[str, object]:
    """summary.json: the suggestion, why, every rule's value, the sweep's bounds, how and why it stopped."""
    curve, s, usable = found.curve, found.suggestion, found.usable
    return {
        "suggestion": s.lr,
        "method": s.method,
        "confidence": round(s.confidence, 3),
        "reason": s.reason,
        "fallback_reason": s.reason if s.method == "fallback" else None,
        "candidates": s.candidates,
        "lr_low": s.lr_low,
        "lr_high": s.lr_high,
        "lr_min": curve.lr_min,
        "lr_max": curve.lr_max,
        "lr_steps": found.lr_steps,  # asked; steps_requested is what the fit's length allowed (SWEEP_SHARE)
        "steps_requested": curve.steps_requested,
        "steps_run": curve.steps_run,
        "stopped_on_divergence": curve.stopped_early or bool(usable.reason),
        "divergence": usable.reason or None,
        "momentum": curve.momentum,  # the optimizer's heavy-ball momentum as it swept (rules.momentum_lag)
        "cliff": rules.cliff(found.signal, curve.momentum),  # nothing trains within rules.CLIFF_MARGIN of it
        "stop_reason": curve.stop_reason or None,
        "seconds": round(curve.seconds, 3),
        "fit_steps": found.fit_steps,
        "repeats": len(found.repeat_suggestions),
        "repeat_suggestions": list(found.repeat_suggestions),
        "spread_decades": found.spread_decades,
        "world_size": curve.world_size,
        **extra,
    }


def curve_csv(found: RangeTest) -> str:
    """step, lr, raw loss, smoothed loss (nan past divergence) and, when probing, the probe's loss."""
    curve, smoothed = found.curve, found.usable.smoothed.tolist()
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["step", "lr", "loss", "smoothed_loss"] + (["probe_loss"] if curve.probe_losses else []))
    for i, (lr, loss) in enumerate(zip(curve.lrs, curve.losses, strict=True)):
        row = [i, f"{lr:.6g}", f"{loss:.6g}", f"{smoothed[i]:.6g}" if i < len(smoothed) else "nan"]
        writer.writerow(row + ([f"{curve.probe_losses[i]:.6g}"] if curve.probe_losses else []))
    return rows.getvalue()


def curve_metrics(found: RangeTest) -> dict[str, list[float]]:
    """The range test as metrics with step = sweep step, so that MLflow's chart view overlays the range tests of
    several runs: with lr_find_log10_lr as the x axis (MLflow's charts take no log scale on a metric axis), or
    lr_find_lr. Non-finite losses are left out, as every metric's are."""
    curve = found.curve
    return {
        "lr_find_lr": list(curve.lrs),
        "lr_find_log10_lr": [math.log10(lr) for lr in curve.lrs],
        "lr_find_loss": list(curve.losses),
        "lr_find_smoothed_loss": found.usable.smoothed.tolist(),
    }


def plot(found: RangeTest, used: float, checked: Verification | None = None, monitor: str = "") -> bytes:
    """loss_vs_lr.png: the curve, every rule's value, the suggestion, the LR the fit used, verification's trials."""
    curve, s = found.curve, found.suggestion
    trials = [(t.lr, f"{monitor} {t.score:.4g}") for t in checked.trials] if checked is not None else []
    verified = checked.lr if checked is not None and checked.lr is not None else 0.0
    return plots.loss_vs_lr(
        curve.lrs,
        curve.losses,
        found.usable.smoothed.tolist(),
        chosen=s.lr,
        method=s.method,
        marks=s.candidates,
        probe=curve.probe_losses,
        used=used,
        trials=trials,
        verified=verified,
    )


def verify_csv(checked: Verification, monitor: str) -> str:
    """One row per trial: its LR, the monitored validation value it reached (nan: diverged), the steps it ran, its
    seconds, and whether it won."""
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["lr", monitor, "steps", "seconds", "chosen"])
    for t in checked.trials:
        writer.writerow([f"{t.lr:.6g}", f"{t.score:.6g}", t.steps, f"{t.seconds:.3f}", str(t.lr == checked.lr).lower()])
    return rows.getvalue()


def verify_summary(checked: Verification) -> dict[str, object]:
    """summary.json's "verify": what was asked, whether the trials ran and why (not), and what they cost."""
    return {
        "setting": checked.setting,
        "ran": checked.ran,
        "lowered": checked.lowered,
        "reason": checked.reason,
        "why": checked.plan.reason,
        "candidates": list(checked.plan.candidates),
        "steps_per_candidate": checked.plan.steps,
        "start": checked.start,  # the monitored value untrained: each candidate's gain is measured from it
        "steps_run": checked.steps,
        "seconds": round(checked.seconds, 3),
        "lr": checked.lr,
    }
