"""Figures, drawn with matplotlib's Agg backend into PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np


def loss_vs_lr(
    lrs: Sequence[float],
    losses: Sequence[float],
    smoothed: Sequence[float],
    *,
    chosen: float,
    method: str,
    marks: Mapping[str, float | None],
    probe: Sequence[float] = (),
    used: float = 0.0,
    trials: Sequence[tuple[float, str]] = (),
    verified: float = 0.0,
) -> bytes:
    """The range-test curve on a log-x axis: raw and smoothed loss (and the held-out probe's), every rule's value,
    the suggestion bold and the LR the fit used (the one-cycle peak) dashed; verification's candidates (LR, score)
    thin grey and the one it chose bold green. Lines that fall on one LR are drawn once, their labels joined."""
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
    lines = [(f"suggested ({method})", chosen, {"color": "tab:red", "lw": 2})]
    if verified > 0:
        lines.insert(0, ("verified", verified, {"color": "tab:green", "lw": 2.5}))
    if used > 0:
        lines.append(("used by the fit", used, {"color": "black", "lw": 1.5, "ls": "--"}))
    colors = ("tab:green", "tab:purple", "tab:orange")
    lines += [
        (name, v, {"color": c, "ls": ":", "lw": 1.2}) for (name, v), c in zip(marks.items(), colors, strict=False) if v
    ]
    lines += [(f"candidate ({score})", lr, {"color": "0.45", "lw": 1, "ls": "-."}) for lr, score in trials]
    for labels, value, style in merge_marks(lines):
        ax.axvline(value, label=f"{' = '.join(labels)}: {value:.3g}", **style)
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


def merge_marks(lines: Sequence[tuple[str, float, dict]]) -> list[tuple[list[str], float, dict]]:
    """Vertical lines within 1% of each other's LR become one line, labelled with every name, styled as the
    first: two lines drawn on top of each other would hide one."""
    merged: list[tuple[list[str], float, dict]] = []
    for name, value, style in lines:
        same = next((m for m in merged if abs(m[1] - value) <= 0.01 * max(m[1], value)), None)
        if same is None:
            merged.append(([name], value, style))
        else:
            same[0].append(name)
    return merged


def comparison(curves: Mapping[str, Sequence[Mapping[str, float]]], monitor: str, highlight: str = "") -> bytes:
    """Validation figures per epoch, one line per study member, `highlight` drawn bold: the monitored one, and
    validation accuracy beside it where the members report it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [monitor] + [k for k in ("val_acc", "val_loss") if k != monitor]
    keys = [k for k in shown if any(k in h for history in curves.values() for h in history)][:2] or [monitor]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.5), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, history in curves.items():
            points = [(i + 1, h[key]) for i, h in enumerate(history) if key in h]
            style = {"lw": 3, "color": "tab:red", "zorder": 3} if label == highlight else {"lw": 1.5}
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, **style)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if "loss" in key:
            ax.set_yscale("log")
    axes[0][0].legend(loc="best", fontsize=9)
    fig.suptitle("LR study: validation curves per learning rate")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
