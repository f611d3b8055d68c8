"""Learning-rate suggestions from a range-test curve: pure numpy on (lrs, raw losses), no trainer needed.

Every suggester takes the sweep's learning rates and *raw* per-step losses in sweep order (NaN/inf allowed)
and returns a Suggestion with a value, a confidence in [0, 1] and a reason a person can read.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

MIN_POINTS = 10  # fewer usable points than this and no curve shape can be trusted
MIN_DROP = 0.02  # a smoothed loss that never falls 2% below its start is "flat"
DIVERGE_FACTOR = 4.0  # as Lightning's early stop: past 4x the best loss the sweep has diverged
SAFETY = 2.0  # never suggest within this factor of the LR at the loss minimum: divergence is near


@dataclass(frozen=True)
class Suggestion:
    lr: float | None  # None only from a single rule that found nothing; suggest() never returns None
    method: str
    confidence: float
    reason: str
    lr_low: float = 0.0  # a range for cyclical schedules: (lr_low, lr_high)
    lr_high: float = 0.0
    candidates: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Curve:
    """The usable part of a sweep: finite, before divergence, with its zero-phase smoothing."""

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    stopped_at: int  # index of the first discarded point (len(input) when none was discarded)
    reason: str  # why points were discarded, or ""

    @property
    def log_lrs(self) -> np.ndarray:
        return np.log10(self.lrs)


def smooth(losses: Sequence[float], sigma: float | None = None) -> np.ndarray:
    """Zero-phase Gaussian smoothing over sweep steps (no lag, unlike Lightning's running average)."""
    y = np.asarray(losses, dtype=float)
    n = len(y)
    if n < 3:
        return y.copy()
    sigma = sigma if sigma is not None else max(1.0, n / 30)
    radius = int(3 * sigma)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    num = np.convolve(y, kernel, mode="full")[radius : radius + n]
    den = np.convolve(np.ones(n), kernel, mode="full")[radius : radius + n]  # renormalise at the edges
    return num / den


def usable_curve(lrs: Sequence[float], losses: Sequence[float]) -> Curve:
    """Cut the curve at the first non-finite loss, then where the smoothed loss exceeds 4x its minimum."""
    x = np.asarray(lrs, dtype=float)
    y = np.asarray(losses, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"lrs and losses differ in length ({len(x)} vs {len(y)})")
    bad = np.flatnonzero(~np.isfinite(y) | ~np.isfinite(x) | (x <= 0))
    end, reason = (int(bad[0]), "non-finite loss") if len(bad) else (len(y), "")
    sm = smooth(y[:end])
    if end:
        best = np.minimum.accumulate(sm)
        over = np.flatnonzero((sm > DIVERGE_FACTOR * best) & (np.arange(end) > np.argmin(sm)))
        if len(over):
            end, reason = int(over[0]), f"loss above {DIVERGE_FACTOR:g}x its minimum"
            sm = smooth(y[:end])
    return Curve(x[:end], y[:end], sm, end, reason)


def _descending_part(curve: Curve) -> tuple[int, int] | None:
    """Indices (start, stop) of the stretch up to the smoothed minimum, if it falls enough to mean anything."""
    n = len(curve.smoothed)
    if n < MIN_POINTS:
        return None
    i_min = int(np.argmin(curve.smoothed))
    start_level = float(np.median(curve.smoothed[: max(3, n // 20)]))
    if i_min < 3 or curve.smoothed[i_min] > start_level * (1 - MIN_DROP):
        return None
    return 0, i_min


def _why_none(curve: Curve) -> str:
    if len(curve.smoothed) < MIN_POINTS:
        cut = f" (cut at step {curve.stopped_at}: {curve.reason})" if curve.reason else ""
        return f"only {len(curve.smoothed)} usable points{cut}, need {MIN_POINTS}"
    return f"the loss never fell {MIN_DROP:.0%} below its starting level (flat curve)"


def steepest(curve: Curve) -> Suggestion:
    """The LR where the smoothed loss falls fastest against log10(LR), before the minimum."""
    part = _descending_part(curve)
    if part is None:
        return Suggestion(None, "steepest", 0.0, _why_none(curve))
    start, stop = part
    skip = max(1, (stop - start) // 10)  # the edges of a smoothed curve are least reliable
    grad = np.gradient(curve.smoothed, curve.log_lrs)
    lo, hi = start + skip, max(start + skip + 1, stop - 1)
    i = lo + int(np.argmin(grad[lo:hi]))
    lr = float(curve.lrs[i])
    return Suggestion(lr, "steepest", 1.0, f"steepest descent of the smoothed loss at step {i}")


def _longest_descent(y: np.ndarray) -> tuple[int, int]:
    """fastai's valley: (start, end) of the longest decreasing subsequence, in O(n log n)."""
    tails: list[float] = []  # tails[k]: largest -end value of a decreasing run of length k+1
    best_len, best_end = 1, 0
    for i, value in enumerate(-y):
        k = bisect_left(tails, value)
        if k == len(tails):
            tails.append(value)
        else:
            tails[k] = value
        if k + 1 > best_len:
            best_len, best_end = k + 1, i
    return best_end - best_len + 1, best_end


def valley(curve: Curve) -> Suggestion:
    """fastai's valley: a point in the first half of the longest descending stretch of the smoothed loss."""
    if _descending_part(curve) is None:
        return Suggestion(None, "valley", 0.0, _why_none(curve))
    start, end = _longest_descent(curve.smoothed)
    sections = (end - start) / 3
    i = start + int(sections) + int(sections / 2)
    return Suggestion(float(curve.lrs[i]), "valley", 1.0, f"valley of steps {start}-{end}")


def minimum(curve: Curve) -> Suggestion:
    """The classic rule of thumb: a tenth of the LR at the loss minimum."""
    part = _descending_part(curve)
    if part is None:
        return Suggestion(None, "minimum", 0.0, _why_none(curve))
    i = part[1]
    return Suggestion(float(curve.lrs[i]) / 10, "minimum", 1.0, f"a tenth of the LR at the minimum (step {i})")


RULES: dict[str, Callable[[Curve], Suggestion]] = {"steepest": steepest, "valley": valley, "minimum": minimum}


def combined(curve: Curve) -> Suggestion:
    """The geometric mean of the steepest descent and half the LR at the loss minimum, capped at the latter.

    Each alone fails in a known way: steepest descent lands low when the curve falls early and long (Adam),
    the minimum sits close to divergence when the curve falls late (SGD with momentum). Between the two, the
    suggestion stays a safety factor below the minimum and above the slow-learning plateau.
    """
    found = {name: rule(curve) for name, rule in RULES.items()}
    candidates = {name: s.lr for name, s in found.items()}
    steep = found["steepest"].lr
    if steep is None:
        return Suggestion(None, "combined", 0.0, found["steepest"].reason, candidates=candidates)
    ceiling = float(curve.lrs[int(np.argmin(curve.smoothed))]) / SAFETY
    lr = min(math.sqrt(steep * ceiling), ceiling)
    reason = f"geometric mean of steepest={steep:.3g} and minimum/{SAFETY:g}={ceiling:.3g}"
    if lr >= ceiling:
        reason = f"steepest={steep:.3g} is past minimum/{SAFETY:g}: capped at {ceiling:.3g}"
    # Confidence: the two agree within a decade -> 1; two decades apart -> 0.
    confidence = float(np.clip(1.5 - abs(math.log10(ceiling / steep)) / 2, 0.0, 1.0))
    return Suggestion(lr, "combined", confidence, reason, candidates=candidates)


METHODS: dict[str, Callable[[Curve], Suggestion]] = {"combined": combined, **RULES}


def lr_range(curve: Curve, lr: float) -> tuple[float, float]:
    """(lr_low, lr_high) for cyclical schedules (Smith 2018): the peak near the largest LR that still trains
    well, half the LR at the loss minimum, but between 1x and 2x the suggestion; the low end a tenth of it."""
    lr_at_min = float(curve.lrs[int(np.argmin(curve.smoothed))]) if len(curve.smoothed) else lr
    high = max(lr, min(lr_at_min / 2, 2 * lr))
    return high / 10, high


def suggest(
    lrs: Sequence[float], losses: Sequence[float], method: str = "combined", fallback_lr: float = 1e-3
) -> Suggestion:
    """The suggestion for a sweep; never None: with no usable curve, `fallback_lr` and the reason why."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    curve = usable_curve(lrs, losses)
    found = METHODS[method](curve)
    candidates = found.candidates or {name: rule(curve).lr for name, rule in RULES.items()}  # combined has them
    if found.lr is None or not math.isfinite(found.lr):
        low, high = fallback_lr / 10, fallback_lr
        return Suggestion(fallback_lr, "fallback", 0.0, found.reason, low, high, candidates)
    low, high = lr_range(curve, found.lr)
    return Suggestion(found.lr, found.method, found.confidence, found.reason, low, high, candidates)
