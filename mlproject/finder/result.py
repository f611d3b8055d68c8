"""What the range test found, and the LR choice the finder hands the fit."""

from __future__ import annotations

from dataclasses import dataclass

from mlproject.finder import rules
from mlproject.finder.sweep import LRCurve
from mlproject.finder.verify import Verification


@dataclass(frozen=True)
class RangeTest:
    """A range test's outcome: the sweep that was plotted (the median repeat's), the usable part of its training
    loss, read once, and its suggestion."""

    curve: LRCurve
    usable: rules.Curve  # the training loss before divergence, smoothed: what the records show
    signal: rules.Curve  # what the suggestion was read from: `usable`, or the held-out probe's (lr_probe)
    suggestion: rules.Suggestion
    repeat_suggestions: tuple[float, ...]  # every repeat's, in run order
    spread_decades: float
    fit_steps: int  # the length of fit the combined rule weighed
    lr_steps: int = 0  # the steps asked for: more than the sweep ran where the fit is short (choose.SWEEP_SHARE)


OWN_LR = "module"  # lr_source of a module that trains at the LR it builds its optimizer at: the job sets none
LR_FREE_SOURCE = "lr-free"  # lr_source of an LR-free optimizer (config.LR_FREE): no range test; it sets its step size


@dataclass(frozen=True)
class LRChoice:
    """The LR the fit trains at, and where it came from."""

    lr: float  # the one-cycle peak when the schedule is onecycle; nan: the module's own, read back at the fit
    source: str  # finder, verified, fixed, fallback, module (OWN_LR) or lr-free (LR_FREE_SOURCE)
    lr_low: float = 0.0  # the one-cycle start; 0: the schedule's default
    range_test: RangeTest | None = None
    verification: Verification | None = None

    @property
    def suggested(self) -> float:
        """The range test's suggestion (the LR itself when there was no range test)."""
        return self.range_test.suggestion.lr if self.range_test is not None else self.lr
