"""Learning-rate suggestions from a range-test curve: pure numpy on (lrs, raw losses), no trainer needed.

Every suggester takes the sweep's learning rates and *raw* per-step losses in sweep order (NaN/inf allowed)
and returns a Suggestion with a value, a confidence in [0, 1] and a reason a person can read.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

MIN_POINTS = 10  # fewer usable points than this and no curve shape can be trusted
MIN_DROP = 0.02  # a smoothed loss that never falls 2% below its start is "flat"
DIVERGE_FACTOR = 4.0  # as Lightning's early stop: past 4x the best loss the sweep has diverged
SAFETY = 2.0  # never suggest within this factor of the floor of the curve: divergence is near
# The one-cycle peak may sit closer: its warm-up (from a tenth of it) protects it (Smith 2018); floor/1.5 beat
# floor/2 on the default job (docs/suggestion.md).
PEAK_SAFETY = 1.5
PEAK_CAP = 3.0  # ... and it stays within 3x the suggestion
# Nothing the job trains at, the suggestion or the one-cycle peak, sits within this factor of the LR where the
# sweep's loss diverged (corrected for momentum's lag, momentum_lag) or climbed back above its start: the sweep
# spent one step at each LR, a fit spends thousands, and a loss that grows a little each step there grows without
# end over a fit. A factor of 2 is the distance at which no seed of the quality benchmark's SGD cases diverged
# (docs/suggestion.md).
CLIFF_MARGIN = 2.0
BOTTOM_TOLERANCE = 0.2  # the floor: within 20% of the drop from the smoothed minimum
# A curve that falls less than 20% below its start before it climbs back (SGD with momentum cut short by
# instability) says little: the combined rule's confidence scales down below it (docs/suggestion.md).
DEEP_DROP = 0.2
SHORT_FIT, LONG_FIT = 100, 600  # training steps: at or below SHORT_FIT the combined rule takes the ceiling
# Widths in decades of LR, not in points, so that a sweep stopped early is read exactly as the full one would
# be: the default sweep (1e-6 .. 1 in 100 steps) has 16.5 points a decade.
SMOOTH_DECADES = 0.202  # the Gaussian's sigma: 100/30 steps of the default sweep
START_DECADES = 0.25  # the stretch whose median is the curve's starting level
# The curve is cut where the loss climbs back above its start after a real descent (and the range test stops
# there): the smoothed loss at least MIN_DROP below its start before, and that drop at least RISE_NOISE times the
# raw losses' scatter around the smoothed curve, so that noise on a plateau does not count.
RISE_NOISE = 3.0
RISE_REASON = "loss back above its start"
EDGE_SHARE = 0.05  # a smoothed minimum in the sweep's last 5% of points: the floor lies beyond lr_max, not in it
CHECKS = 200  # a sweep past 2 * CHECKS steps is checked every len // CHECKS steps: a long sweep stays cheap
FFT_RADIUS = 100  # smoothing kernels wider than this convolve by FFT (sweeps of thousands of steps)


@dataclass(frozen=True)
class Suggestion:
    lr: float
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
    per_decade: float = 0.0  # sweep steps per decade of LR (0: the LRs do not rise)
    sigma: float = 1.0  # the smoothing's sigma, in steps

    @property
    def log_lrs(self) -> np.ndarray:
        return np.log10(self.lrs)


def points_per_decade(lrs: Sequence[float] | np.ndarray) -> float:
    """Sweep steps per decade of LR, from the first and last LR of an exponential sweep; 0 when they do not rise."""
    if len(lrs) < 2 or not 0 < lrs[0] < lrs[-1] < math.inf:
        return 0.0
    return (len(lrs) - 1) / math.log10(lrs[-1] / lrs[0])


def smooth(losses: Sequence[float] | np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Zero-phase Gaussian smoothing over sweep steps (no lag, unlike Lightning's running average);
    `sigma` in steps, by default a thirtieth of the curve."""
    y = np.asarray(losses, dtype=float)
    n = len(y)
    if n < 3:
        return y.copy()
    sigma = sigma if sigma is not None else max(1.0, n / 30)
    radius = int(3 * sigma)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    num = _convolve(y, kernel)[radius : radius + n]
    den = _convolve(np.ones(n), kernel)[radius : radius + n]  # renormalise at the edges
    return num / den


def _convolve(y: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    if len(kernel) <= 2 * FFT_RADIUS + 1:
        return np.convolve(y, kernel, mode="full")
    size = len(y) + len(kernel) - 1
    fft = 1 << (size - 1).bit_length()
    return np.fft.irfft(np.fft.rfft(y, fft) * np.fft.rfft(kernel, fft), fft)[:size]


def usable_curve(lrs: Sequence[float], losses: Sequence[float]) -> Curve:
    """Cut the curve at the first non-finite loss, then where the smoothed loss exceeds 4x its minimum or, after a
    real descent, climbs back above its starting level (whichever comes first)."""
    x = np.asarray(lrs, dtype=float)
    y = np.asarray(losses, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"lrs and losses differ in length ({len(x)} vs {len(y)})")
    bad = np.flatnonzero(~np.isfinite(y) | ~np.isfinite(x) | (x <= 0))
    end, reason = (int(bad[0]), "non-finite loss") if len(bad) else (len(y), "")
    density = points_per_decade(x[:end])
    sigma = _sigma(density, end)
    sm = smooth(y[:end], sigma)
    if end:
        best = np.minimum.accumulate(sm)
        over = np.flatnonzero((sm > DIVERGE_FACTOR * best) & (np.arange(end) > np.argmin(sm)))
        if len(over):  # re-smoothed without the blow-up, whose values would swamp everything near it
            end, reason = int(over[0]), f"loss above {DIVERGE_FACTOR:g}x its minimum"
            sm = smooth(y[:end], sigma)
        rise = _rise(y[:end], sm, _start_of(sm, density))
        if rise is not None:  # not re-smoothed: the climb still weighs on the points before it, as without the cut
            end, reason, sm = rise, RISE_REASON, sm[:rise]
    return Curve(x[:end], y[:end], sm, end, reason, density, sigma)


def _sigma(per_decade: float, points: int) -> float:
    """SMOOTH_DECADES in steps of a sweep (1 at least); a thirtieth of the points if its LRs do not rise. At most a
    third of the points: a sweep narrower than the window would otherwise smooth with a kernel millions of steps
    wide, every check."""
    wanted = SMOOTH_DECADES * per_decade if per_decade else points / 30
    return max(1.0, min(wanted, points / 3))


def _start_level(curve: Curve) -> float:
    return _start_of(curve.smoothed, curve.per_decade)


def _start_of(smoothed: np.ndarray, per_decade: float) -> float:
    """The loss before the sweep moves it: the median of the smoothed curve over its first START_DECADES
    (3 points or more; the first 5% of a sweep whose LRs do not rise)."""
    count = int(START_DECADES * per_decade) + 1 if per_decade else len(smoothed) // 20
    return float(np.median(smoothed[: max(3, count)]))


def stop_reason(lrs: Sequence[float], losses: Sequence[float]) -> str:
    """Why a range test may stop after these steps, or "" to go on. It stops at a non-finite loss, and once a
    whole smoothing window has passed where usable_curve cuts the curve (4x the minimum, or back above the start
    after a real descent): the curve up to that point is then smoothed exactly as in a sweep that ran on. This is
    a heuristic, not a proof: it assumes that a network trained into a loss above the untrained one does not find
    a deeper minimum at still larger LRs.
    """
    n = len(losses)
    if n and not math.isfinite(losses[-1]):
        return "non-finite loss"
    if n % max(1, n // CHECKS):
        return ""
    curve = usable_curve(lrs, losses)
    return curve.reason if curve.reason and n - 1 - curve.stopped_at >= int(3 * curve.sigma) else ""


def stop_step(lrs: Sequence[float], losses: Sequence[float]) -> int | None:
    """After how many steps a range test of this whole curve would stop (stop_reason replayed step by step);
    None when it runs to the end."""
    return next((k for k in range(1, len(losses) + 1) if stop_reason(lrs[:k], losses[:k])), None)


def _rise(losses: np.ndarray, smoothed: np.ndarray, start: float) -> int | None:
    """The first step where the smoothed loss climbs back above its starting level after a real descent: its
    lowest point so far at least MIN_DROP of the start and RISE_NOISE times the raw losses' scatter below it.
    Whatever the curve does beyond (a network that diverged and recovered, or died to chance level) says nothing
    of an LR that trains: the floor lies before it."""
    low = np.minimum.accumulate(smoothed)
    at_low = np.maximum.accumulate(np.where(smoothed <= low, np.arange(len(smoothed)), 0))  # where `low` was set
    real: dict[int, bool] = {}  # by the index of the lowest point so far: a long sweep checks each once
    for i in np.flatnonzero((start - low >= MIN_DROP * start) & (smoothed > start)):
        j = int(at_low[i])
        if j not in real:
            scatter = 1.4826 * float(np.median(np.abs(losses[: j + 1] - smoothed[: j + 1])))  # robust std
            real[j] = start - smoothed[j] >= RISE_NOISE * scatter
        if real[j]:
            return int(i)
    return None


def _descending_part(curve: Curve) -> tuple[int, int] | None:
    """Indices (start, stop) of the stretch up to the smoothed minimum, if it falls enough to mean anything."""
    n = len(curve.smoothed)
    if n < MIN_POINTS:
        return None
    i_min = int(np.argmin(curve.smoothed))
    if i_min < 3 or curve.smoothed[i_min] > _start_level(curve) * (1 - MIN_DROP):
        return None
    return 0, i_min


def _why_none(curve: Curve) -> str:
    if len(curve.smoothed) < MIN_POINTS:
        cut = f" (cut at step {curve.stopped_at}: {curve.reason})" if curve.reason else ""
        return f"only {len(curve.smoothed)} usable points{cut}, need {MIN_POINTS}"
    return f"the loss never fell {MIN_DROP:.0%} below its starting level (flat curve)"


def steepest(curve: Curve) -> Suggestion | None:
    """The LR where the smoothed loss falls fastest against log10(LR), before the minimum; None (as for every
    rule) when the curve has no descent to read (_why_none says why)."""
    part = _descending_part(curve)
    if part is None:
        return None
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


def valley(curve: Curve) -> Suggestion | None:
    """fastai's valley: a point in the first half of the longest descending stretch of the smoothed loss."""
    if _descending_part(curve) is None:
        return None
    start, end = _longest_descent(curve.smoothed)
    sections = (end - start) / 3
    i = start + int(sections) + int(sections / 2)
    return Suggestion(float(curve.lrs[i]), "valley", 1.0, f"valley of steps {start}-{end}")


def minimum(curve: Curve) -> Suggestion | None:
    """The classic rule of thumb: a tenth of the LR at the loss minimum."""
    part = _descending_part(curve)
    if part is None:
        return None
    i = part[1]
    return Suggestion(float(curve.lrs[i]) / 10, "minimum", 1.0, f"a tenth of the LR at the minimum (step {i})")


Rule = Callable[[Curve], Suggestion | None]
RULES: dict[str, Rule] = {"steepest": steepest, "valley": valley, "minimum": minimum}


def bottom(curve: Curve, tolerance: float = BOTTOM_TOLERANCE) -> float:
    """The geometric centre of the stretch around the smoothed minimum that lies within `tolerance` of the
    drop (start level to minimum) from the minimum: the curve's floor, steadier between seeds than its argmin."""
    sm = curve.smoothed
    i_min = int(np.argmin(sm))
    level = sm[i_min] + tolerance * max(0.0, _start_level(curve) - float(sm[i_min]))
    lo = hi = i_min
    while lo > 0 and sm[lo - 1] <= level:
        lo -= 1
    while hi + 1 < len(sm) and sm[hi + 1] <= level:
        hi += 1
    return float(10 ** np.mean(curve.log_lrs[lo : hi + 1]))


def ceiling(curve: Curve) -> float:
    """The largest LR the combined rule will suggest: SAFETY below the floor."""
    return bottom(curve) / SAFETY


def toward_floor(train_steps: int | None) -> float:
    """How far (in log LR) the combined rule moves from the steepest descent toward the floor's ceiling:
    1/2 for trainings of LONG_FIT steps or more (and when the length is unknown), all the way for SHORT_FIT
    steps or fewer, log-linear between. A short fit has no time to profit from a smaller, steadier LR."""
    if not train_steps or train_steps >= LONG_FIT:
        return 0.5
    if train_steps <= SHORT_FIT:
        return 1.0
    return 1.0 - 0.5 * math.log(train_steps / SHORT_FIT) / math.log(LONG_FIT / SHORT_FIT)


def combined(curve: Curve, train_steps: int | None = None) -> Suggestion | None:
    """Between the steepest descent and a ceiling SAFETY below the floor of the curve, capped at the ceiling.

    Each end alone fails in a known way: steepest descent lands low when the curve falls early and long (Adam),
    the floor sits close to divergence when the curve falls late (SGD with momentum). The geometric mean of
    the two (weight `toward_floor(train_steps)`) stays below divergence and above the slow-learning plateau.
    """
    candidates = answers(curve)
    steep = candidates["steepest"]
    if steep is None:
        return None
    top = ceiling(curve)
    w = toward_floor(train_steps)
    lr = min(steep ** (1 - w) * top**w, top)
    reason = f"{1 - w:.2f}:{w:.2f} geometric mean of steepest={steep:.3g} and floor/{SAFETY:g}={top:.3g}"
    if lr >= top:
        reason = f"floor/{SAFETY:g}={top:.3g} (steepest={steep:.3g}, weight {w:.2f} toward the floor)"
    # Confidence: the two agree within a decade -> 1, three decades apart -> 0; scaled down for a shallow descent.
    agreement = float(np.clip(1.5 - abs(math.log10(top / steep)) / 2, 0.0, 1.0))
    drop = depth(curve)
    if drop < DEEP_DROP:
        reason += f"; a shallow descent ({drop:.0%} below the start)"
    return Suggestion(lr, "combined", agreement * min(1.0, drop / DEEP_DROP), reason, candidates=candidates)


def depth(curve: Curve) -> float:
    """How far the smoothed loss falls below its starting level, as a share of it."""
    start = _start_level(curve)
    return max(0.0, (start - float(np.min(curve.smoothed))) / start) if start > 0 else 0.0


METHODS: dict[str, Rule] = {"combined": combined, **RULES}


def answers(curve: Curve) -> dict[str, float | None]:
    """Each single rule's LR for the curve, None where it found none: the candidates a suggestion reports."""
    return {name: found.lr if (found := rule(curve)) else None for name, rule in RULES.items()}


def cliff(curve: Curve, momentum: float = 0.0) -> float | None:
    """The LR the sweep's loss diverged at (non-finite, or 4x its minimum) or climbed back above its start, read
    where the curve was cut; None for a curve never cut. A divergence is moved down by momentum_lag: with a
    heavy-ball optimizer it shows steps after the LR that caused it. The climb back is not: on the shallow curves of
    SGD with momentum it comes before divergence, not after (docs/suggestion.md)."""
    if not curve.reason or not len(curve.lrs):
        return None
    edge = float(curve.lrs[-1])
    return edge if curve.reason == RISE_REASON else edge * momentum_lag(momentum, curve.per_decade)


def momentum_lag(momentum: float, per_decade: float) -> float:
    """The factor by which a heavy-ball optimizer's sweep reads a divergence too high. Its step is the LR times a
    buffer that carries each gradient on for about 1/(1-momentum) steps (the buffer's time constant), so an
    instability grows through the buffer and shows that many steps after the LR that set it off, by which time the
    sweep has raised the LR 10^(lag/per_decade)-fold. 1 without momentum; at the default sweep's 16.5 steps a decade
    and momentum 0.9, a lag of 10 steps: 0.25."""
    if momentum <= 0 or per_decade <= 0:
        return 1.0
    return float(10 ** (-1 / (1 - momentum) / per_decade))


def off_the_cliff(found: Suggestion, curve: Curve, momentum: float) -> Suggestion:
    """The suggestion and its one-cycle range kept CLIFF_MARGIN below the cliff, with the reason when they moved."""
    edge = cliff(curve, momentum)
    if edge is None or found.lr_high <= edge / CLIFF_MARGIN and found.lr <= edge / CLIFF_MARGIN:
        return found
    top = edge / CLIFF_MARGIN
    lr, high = min(found.lr, top), min(found.lr_high, top)
    why = f"; kept at {top:.3g}, {CLIFF_MARGIN:g}x below lr {edge:.3g}, where the sweep was cut ({curve.reason})"
    return replace(found, lr=lr, lr_low=min(found.lr_low, high / 10), lr_high=high, reason=found.reason + why)


def lr_range(curve: Curve, lr: float) -> tuple[float, float]:
    """(lr_low, lr_high) for cyclical schedules (Smith 2018): the peak near the largest LR that still trains
    well, PEAK_SAFETY below the floor, but between 1x and PEAK_CAP x the suggestion; the low end a tenth of it."""
    top = bottom(curve) / PEAK_SAFETY if len(curve.smoothed) else lr
    high = max(lr, min(top, PEAK_CAP * lr))
    return high / 10, high


def suggest(
    lrs: Sequence[float],
    losses: Sequence[float],
    method: str = "combined",
    fallback_lr: float = 1e-3,
    train_steps: int | None = None,
    momentum: float = 0.0,
) -> Suggestion:
    """The suggestion for a sweep's LRs and raw losses: suggest_curve() on its usable part."""
    return suggest_curve(usable_curve(lrs, losses), method, fallback_lr, train_steps, momentum)


def suggest_curve(
    curve: Curve,
    method: str = "combined",
    fallback_lr: float = 1e-3,
    train_steps: int | None = None,
    momentum: float = 0.0,
) -> Suggestion:
    """The suggestion for a usable curve; never None: with no descent to read, `fallback_lr` and the reason why.

    `train_steps`, the length of the training the LR is for, moves the combined rule toward the floor of
    the curve for short trainings (see toward_floor); unknown, it assumes a long one. The answer, and its
    one-cycle peak, stay CLIFF_MARGIN below where the curve diverged (`momentum`: the sweep's, see momentum_lag).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    found = combined(curve, train_steps) if method == "combined" else METHODS[method](curve)
    candidates = found.candidates if found and found.candidates else answers(curve)  # combined has them
    if found is None or not math.isfinite(found.lr):
        low, high = fallback_lr / 10, fallback_lr
        why = found.reason if found else _why_none(curve)
        return Suggestion(fallback_lr, "fallback", 0.0, why, low, high, candidates)
    low, high = lr_range(curve, found.lr)
    made = Suggestion(found.lr, found.method, found.confidence, found.reason, low, high, candidates)
    return off_the_cliff(made, curve, momentum)


def guard_edge(found: Suggestion, curve: Curve, ran_to_end: bool) -> Suggestion:
    """A curve still falling at lr_max has no floor in the sweep: the rules' floor is then the sweep's edge, and a
    one-cycle peak there can diverge over a long fit. The answer becomes the steepest descent, not the floor's,
    with confidence 0 and the reason; a sweep that diverged, or stopped early, found its floor."""
    n = len(curve.smoothed)
    if not ran_to_end or curve.reason or n < MIN_POINTS or found.method == "fallback":
        return found
    if int(np.argmin(curve.smoothed)) < n * (1 - EDGE_SHARE):
        return found
    steep = found.candidates.get("steepest") or found.lr
    lr_max = float(curve.lrs[-1])  # an uncut curve: the sweep's last LR
    reason = (
        f"the loss still fell at lr_max={lr_max:.3g}: the sweep found no floor, so the steepest descent "
        f"({steep:.3g}) is used; raise lr_max for a better answer"
    )
    return Suggestion(steep, found.method, 0.0, reason, steep / 10, steep, found.candidates)
