"""What a run records besides metrics, prepared as data: the range test's summary, curve and plot; the model with
an input example and signature. tracking.py writes them."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mlproject import lr_range, plots, verify
from mlproject.sweep import LRCurve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RangeTest:
    """A range test's outcome: the curve that was plotted (the median repeat's) and its suggestion."""

    curve: LRCurve
    suggestion: lr_range.Suggestion
    repeat_suggestions: tuple[float, ...]  # every repeat's, in run order
    spread_decades: float
    fit_steps: int  # the length of fit the combined rule weighed


def summary(found: RangeTest, extra: Mapping[str, object]) -> dict[str, object]:
    """summary.json: the suggestion, why, every rule's value, the sweep's bounds, how and why it stopped."""
    curve, s = found.curve, found.suggestion
    usable = lr_range.usable_curve(curve.lrs, curve.losses)
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
        "steps_requested": curve.steps_requested,
        "steps_run": curve.steps_run,
        "stopped_on_divergence": curve.stopped_early or bool(usable.reason),
        "divergence": usable.reason or None,
        "stop_reason": curve.stop_reason or None,
        "seconds": round(curve.seconds, 3),
        "fit_steps": found.fit_steps,
        "repeats": len(found.repeat_suggestions),
        "repeat_suggestions": list(found.repeat_suggestions),
        "spread_decades": found.spread_decades,
        "world_size": curve.world_size,
        **extra,
    }


def curve_csv(curve: LRCurve) -> str:
    """step, lr, raw loss, smoothed loss (nan past divergence) and, when probing, the probe's loss."""
    smoothed = lr_range.usable_curve(curve.lrs, curve.losses).smoothed.tolist()
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["step", "lr", "loss", "smoothed_loss"] + (["probe_loss"] if curve.probe_losses else []))
    for i, (lr, loss) in enumerate(zip(curve.lrs, curve.losses, strict=True)):
        row = [i, f"{lr:.6g}", f"{loss:.6g}", f"{smoothed[i]:.6g}" if i < len(smoothed) else "nan"]
        writer.writerow(row + ([f"{curve.probe_losses[i]:.6g}"] if curve.probe_losses else []))
    return rows.getvalue()


def curve_metrics(curve: LRCurve) -> dict[str, list[float]]:
    """The range test as metrics with step = sweep step, so that MLflow's chart view overlays the range tests of
    several runs: with lr_find_log10_lr as the x axis (MLflow's charts take no log scale on a metric axis), or
    lr_find_lr. Non-finite losses are left out, as every metric's are."""
    smoothed = lr_range.usable_curve(curve.lrs, curve.losses).smoothed.tolist()
    return {
        "lr_find_lr": list(curve.lrs),
        "lr_find_log10_lr": [math.log10(lr) for lr in curve.lrs],
        "lr_find_loss": list(curve.losses),
        "lr_find_smoothed_loss": smoothed,
    }


def plot(found: RangeTest, used: float, checked: verify.Verification | None = None, monitor: str = "") -> bytes:
    curve, s = found.curve, found.suggestion
    smoothed = lr_range.usable_curve(curve.lrs, curve.losses).smoothed.tolist()
    trials = [(t.lr, f"{monitor} {t.score:.4g}") for t in checked.trials] if checked is not None else []
    verified = float(checked.lr or 0) if checked is not None else 0.0
    return plots.loss_vs_lr(curve.lrs, curve.losses, smoothed, chosen=s.lr, method=s.method, marks=s.candidates,
                            probe=curve.probe_losses, used=used, trials=trials, verified=verified)  # fmt: skip


def verify_csv(checked: verify.Verification, monitor: str) -> str:
    """One row per trial: its LR, the monitored validation value it reached (nan: diverged), the steps it ran, its
    seconds, and whether it won."""
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["lr", monitor, "steps", "seconds", "chosen"])
    for t in checked.trials:
        writer.writerow([f"{t.lr:.6g}", f"{t.score:.6g}", t.steps, f"{t.seconds:.3f}", str(t.lr == checked.lr).lower()])
    return rows.getvalue()


def verify_summary(checked: verify.Verification) -> dict[str, object]:
    """summary.json's "verify": what was asked, whether the trials ran and why (not), and what they cost."""
    return {
        "setting": checked.setting,
        "ran": checked.ran,
        "reason": checked.reason,
        "why": checked.plan.reason,
        "candidates": list(checked.plan.candidates),
        "steps_per_candidate": checked.plan.steps,
        "start": checked.start,  # the monitored value untrained: each candidate's gain is measured from it
        "steps_run": checked.steps,
        "seconds": round(checked.seconds, 3),
        "lr": checked.lr,
    }


@dataclass(frozen=True)
class ModelPayload:
    """The model to log and what MLflow infers its signature from; `example` None: logged without one."""

    model: torch.nn.Module
    example: np.ndarray | None
    output: np.ndarray | None
    why_no_signature: str = ""


def model_payload(module: Any, builtin: bool, example: Any) -> ModelPayload:
    """The built-in classifier logs its plain network (it loads without this package); a user module logs
    itself. The signature comes from a real batch's input run through the model."""
    model = module.net if builtin else module
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    if example is None:
        return ModelPayload(model, None, None, "the data gives no example input (a data module's batches)")
    if not isinstance(example, torch.Tensor):
        return ModelPayload(model, None, None, f"the model's input is a {type(example).__name__}, not a tensor")
    try:
        with torch.no_grad():
            output = model(example.cpu())
    except Exception as exc:  # a user's forward may expect another input: the model is still logged
        return ModelPayload(model, None, None, f"forward() on a batch's input failed ({type(exc).__name__}: {exc})")
    if not isinstance(output, torch.Tensor):
        return ModelPayload(model, None, None, f"forward() returns a {type(output).__name__}, not a tensor")
    return ModelPayload(model, example.cpu().numpy(), output.float().numpy().astype(np.float32))


def batch_input(batch: Any) -> Any:
    """The model's input in a batch: a tensor batch itself, the first item of a tuple or list; None for a dict."""
    if isinstance(batch, torch.Tensor):
        return batch[:2]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0][:2]
    return None
