"""Figures, drawn with matplotlib's Agg backend into PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np


def loss_vs_lr(
    lrs: Sequence[float],
    losses: Sequence[float],
    smoothed: Sequence[float],
    chosen: float,
    method: str,
    marks: Mapping[str, float | None],
    probe: Sequence[float] = (),
) -> bytes:
    """The range-test curve on a log-x axis: raw and smoothed loss (and the held-out probe's), every rule's
    value, the chosen LR bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    raw = np.asarray(losses, dtype=float)
    finite = np.isfinite(raw)
    ax.plot(np.asarray(lrs)[finite], raw[finite], color="0.7", lw=1, label="loss (raw)")
    ax.plot(lrs[: len(smoothed)], smoothed, color="tab:blue", lw=2, label="loss (smoothed)")
    if len(probe):
        ax.plot(lrs[: len(probe)], probe, color="tab:cyan", lw=1.5, label="held-out probe loss")
    for (name, value), color in zip(marks.items(), ("tab:green", "tab:purple", "tab:orange"), strict=False):
        if value is not None:
            ax.axvline(value, color=color, ls=":", lw=1.2, label=f"{name}: {value:.3g}")
    ax.axvline(chosen, color="tab:red", lw=2, label=f"chosen ({method}): {chosen:.3g}")
    ax.set_xscale("log")
    if finite.any() and len(smoothed):
        top = max(float(np.max(smoothed)), float(raw[finite][0])) * 1.15
        ax.set_ylim(max(0.0, float(np.min(raw[finite])) * 0.9), top)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def comparison(curves: Mapping[str, Sequence[Mapping[str, float]]], highlight: str = "") -> bytes:
    """Validation accuracy and loss per epoch, one line per study member; `highlight` drawn bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    for label, history in curves.items():
        epochs = range(1, len(history) + 1)
        style = {"lw": 3, "color": "tab:red", "zorder": 3} if label == highlight else {"lw": 1.5}
        acc_ax.plot(epochs, [h["val_acc"] for h in history], marker="o", label=label, **style)
        loss_ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label=label, **style)
    for ax, name in ((acc_ax, "validation accuracy"), (loss_ax, "validation loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    loss_ax.set_yscale("log")
    acc_ax.legend(loc="lower right", fontsize=9)
    fig.suptitle("LR study: validation curves per learning rate")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
