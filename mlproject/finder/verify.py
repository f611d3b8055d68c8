"""Verification of the range test's suggestion by trial fits, its pure choices: whether to verify, which candidate LRs
around the suggestion, how many steps each trains, and who won. finder/trials.py trains them: each from the same
weights and batches for a bounded share of the fit's steps, scored on the validation figure the job monitors; the
suggestion stands unless another candidate clearly beats it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from mlproject.finder import rules

AUTO_CANDIDATES = 3  # auto tries the suggestion and its neighbours half a decade below and above
SPACING_DECADES = 0.5  # the quality benchmark's grid: a closer spacing is within one trial's noise of the suggestion
# A trial shorter than this measures the optimizer's warm-up (momentum 0.9 and Adam's first moment average over
# about ten steps), not what the LR is worth over a fit.
MIN_TRIAL_STEPS = 30
# A fit too short for that shortens its trials down to this, the optimizers' ten-step warm-up itself, and drops the
# candidate above (the suggestion and the one below stay); shorter still, the job takes the one below untried.
MIN_SHORT_TRIAL_STEPS = 10
# auto verifies a suggestion whose confidence is below full (rules.combined: the rule's two ends, steepest descent and
# floor/SAFETY, lie more than a decade apart, so it weighs two answers rather than reads one) ...
AUTO_CONFIDENCE = 1.0
AUTO_SPREAD = 0.3  # ... or whose repeated range tests (lr_repeats) spread over more than 0.3 decades
# Another candidate replaces the suggestion only if it gained 1.5 times as much from the untrained value: a short
# trial orders two LRs half a decade apart in either direction of the whole fit's order, while a gross error (a
# candidate that barely trains, or diverges) shows as a gain several times larger (docs/suggestion.md).
CLEAR_GAIN = 1.5


@dataclass(frozen=True)
class Plan:
    """What verification will do: the candidates in trial order (the suggestion first), the steps each trains,
    and why; `skip` says why nothing is trained ("" when the trials run)."""

    candidates: tuple[float, ...]
    steps: int
    reason: str
    skip: str = ""
    lower: bool = False  # too short for any trial: the candidate below the suggestion is taken untried


@dataclass(frozen=True)
class Trial:
    lr: float
    score: float  # the monitored validation value after the trial; nan when the trial diverged
    steps: int  # optimizer steps actually run
    seconds: float
    before: float = math.nan  # the monitored value before training (the first trial measures it)


@dataclass(frozen=True)
class Verification:
    """Verification's outcome: `lr` is the winner, None when it was skipped (`reason` says why)."""

    setting: str  # lr_verify as given
    plan: Plan
    trials: tuple[Trial, ...] = ()
    lr: float | None = None
    reason: str = ""
    suggestion: rules.Suggestion | None = None  # the range test's, moved to `lr` when verification ran (or lowered)

    @property
    def ran(self) -> bool:
        return self.lr is not None

    @property
    def lowered(self) -> bool:
        """Too short to verify: the suggestion moved to the candidate below it, untried."""
        return self.plan.lower

    @property
    def steps(self) -> int:
        return sum(t.steps for t in self.trials)

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.trials)

    @property
    def start(self) -> float:
        """The untrained module's monitored value, from which each candidate's gain is measured."""
        return self.trials[0].before if self.trials else math.nan


# --- pure choices ------------------------------------------------------------------------------------------------


def candidate_count(setting: str, suggestion: rules.Suggestion, spread: float = 0.0) -> tuple[int, str]:
    """How many candidates to train (0: none) and why, from lr_verify (off, auto or a count), the suggestion and
    the spread of repeated range tests (decades)."""
    if setting == "off":
        return 0, "lr_verify=off"
    if setting != "auto":
        return int(setting), f"lr_verify={setting}"
    doubt = doubts(suggestion, spread)
    if not doubt:
        return 0, "the suggestion is confident (a deep descent, its rules within a decade of each other)"
    return AUTO_CANDIDATES, doubt


def doubts(suggestion: rules.Suggestion, spread: float = 0.0) -> str:
    """Why auto should verify this suggestion, or "" when it need not."""
    if suggestion.method == "fallback":
        return f"the range test gave no suggestion ({suggestion.reason}): the fallback lr is verified"
    if suggestion.confidence < AUTO_CONFIDENCE:
        return f"the suggestion's confidence is {suggestion.confidence:.2f} ({suggestion.reason})"
    if spread > AUTO_SPREAD:
        return f"the repeated range tests' suggestions spread over {spread:.2f} decades"
    return ""


def candidates(lr: float, count: int, spacing: float = SPACING_DECADES) -> tuple[float, ...]:
    """`count` LRs `spacing` decades apart around `lr`: lr, then below, above, two below, ... Below comes first:
    a candidate too small trains slowly, one too large can diverge."""
    offsets = [0] + [sign * step for step in range(1, count) for sign in (-1, 1)]
    return tuple(lr * 10 ** (spacing * k) for k in offsets[:count])


def trial_steps(fit_steps: int, fraction: float, count: int) -> tuple[int, int, str]:
    """(candidates, optimizer steps each, how they were shortened) within `fraction` of the fit's steps for all of
    them together: `count` candidates of MIN_TRIAL_STEPS or more; else fewer candidates (two at least), then
    shorter trials down to MIN_SHORT_TRIAL_STEPS; else (0, 0, why)."""
    budget = int(fraction * fit_steps)
    for least in (MIN_TRIAL_STEPS, MIN_SHORT_TRIAL_STEPS):
        for n in range(count, 1, -1):
            if budget // n >= least:
                short = n < count or least < MIN_TRIAL_STEPS
                how = (
                    f"; shortened to {n} candidates of {budget // n} steps: the fit is {fit_steps} steps"
                    if short
                    else ""
                )
                return n, budget // n, how
    return (
        0,
        0,
        (
            f"a budget of {fraction:g} x {fit_steps} fit steps leaves {budget // 2} steps for each of 2 candidates, "
            f"fewer than {MIN_SHORT_TRIAL_STEPS}"
        ),
    )


def plan(setting: str, suggestion: rules.Suggestion, fit_steps: int, fraction: float, spread: float = 0.0) -> Plan:
    count, why = candidate_count(setting, suggestion, spread)
    if count == 0:
        return Plan((), 0, why, skip=why)
    kept, steps, how = trial_steps(fit_steps, fraction, count)
    if kept == 0:  # the curve's answer is doubtful: its safer side; a fallback is lr as given, no reading to doubt
        return Plan(candidates(suggestion.lr, 2), 0, why, skip=how, lower=suggestion.method != "fallback")
    return Plan(candidates(suggestion.lr, kept), steps, why + how)


def better(a: float, b: float, mode: str) -> bool:
    """Whether score a beats score b; nan (a diverged trial) never beats anything."""
    if math.isnan(a):
        return False
    return math.isnan(b) or (a < b if mode == "min" else a > b)


def best_of(trials: Sequence[Trial], mode: str) -> Trial | None:
    """The trial with the best score, the first of equals; None when every trial diverged."""
    best: Trial | None = None
    for t in trials:
        if best is None or better(t.score, best.score, mode):
            best = t
    return best if best is not None and not math.isnan(best.score) else None


def winner(trials: Sequence[Trial], mode: str, start: float = math.nan) -> Trial | None:
    """The first trial (the suggestion's) unless another scored better and gained CLEAR_GAIN times as much from
    `start`, the untrained value (without it, the better score alone); None when every trial diverged."""
    best = best_of(trials, mode)
    if best is None or best is trials[0] or math.isnan(trials[0].score) or math.isnan(start):
        return best
    gain = {id(t): start - t.score if mode == "min" else t.score - start for t in (best, trials[0])}
    return best if gain[id(best)] > CLEAR_GAIN * max(gain[id(trials[0])], 0.0) else trials[0]


def moved(suggestion: rules.Suggestion, lr: float, curve: rules.Curve) -> rules.Suggestion:
    """The suggestion moved to the verified LR, with the one-cycle range the curve gives that LR. A suggestion whose
    range peaks at the LR itself keeps that shape, a tenth of the LR to the LR: a fallback's curve has no floor to
    place a peak by, and one still falling at lr_max (rules.guard_edge) has its floor only at the sweep's edge."""
    if suggestion.method == "fallback" or suggestion.lr_high <= suggestion.lr:
        return replace(suggestion, lr=lr, lr_low=lr / 10, lr_high=lr)
    low, high = rules.lr_range(curve, lr)
    return replace(suggestion, lr=lr, lr_low=low, lr_high=high)
