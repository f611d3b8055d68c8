"""What a person watching the job sees: the range test's start, stop and answer, and a line per epoch (its figures,
the LR, seconds and the time left), or Lightning's progress bar on a terminal."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

log = logging.getLogger("mlproject.progress")

FIRST = ("train_loss", "val_loss", "val_acc")  # shown first when there; the module's other values follow


def mode(progress: str, terminal: bool) -> str:
    """auto: Lightning's bar on a terminal, lines in CI logs and `docker logs`; else as asked."""
    if progress == "auto":
        return "bar" if terminal else "lines"
    return progress


def epoch_line(epoch: int, epochs: int, metrics: Mapping[str, float], elapsed: float) -> str:
    """'epoch 2/4: train_loss 0.4123, val_loss 0.3912, val_acc 0.8612, lr 0.0065; 4.2 s, about 8 s left'."""
    shown = [k for k in FIRST if k in metrics] + sorted(
        k for k in metrics if k not in FIRST and k not in ("learning_rate", "epoch_seconds")
    )
    figures = ", ".join(f"{k} {_number(metrics[k])}" for k in shown)
    lr = metrics.get("learning_rate")
    done = epoch + 1
    left = elapsed / done * (epochs - done) if done else math.nan
    parts = [figures, f"lr {lr:.3g}" if lr is not None else ""]
    timing = (
        f"{metrics.get('epoch_seconds', math.nan):.1f} s, {_duration(left)} left"
        if done < epochs
        else (f"{metrics.get('epoch_seconds', math.nan):.1f} s")
    )
    return f"epoch {done}/{epochs}: " + ", ".join(p for p in parts if p) + f"; {timing}"


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


class EpochLines:
    """A sink that logs each epoch's line (lines mode; silent otherwise)."""

    def __init__(self, epochs: int, shown: bool) -> None:
        self.epochs, self.shown = epochs, shown
        self.started, self.seen = time.perf_counter(), 0

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.seen += 1  # a resumed fit's earlier epochs ran elsewhere: the pace is this process's
        if self.shown:
            per_epoch = (time.perf_counter() - self.started) / self.seen
            log.info("%s", epoch_line(epoch, self.epochs, metrics, per_epoch * (epoch + 1)))


def sweep_start(lr_min: float, lr_max: float, steps: int, shown: bool) -> None:
    if shown:
        log.info("range test: up to %d steps from lr %.3g to %.3g", steps, lr_min, lr_max)
