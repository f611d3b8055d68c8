"""Verification of the range test's suggestion by trial fits: a few candidate LRs around it, each trained from the same
weights and batches for a bounded share of the fit's steps, scored on the validation figure the job monitors; the
suggestion stands unless another candidate clearly beats it. Whether to verify, which candidates, how long and who
won are pure; `run_trials` drives the Trainers and takes what it needs as arguments."""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from mlproject import lr_range, training
from mlproject.config import JobConfig
from mlproject.lightning_api import Lightning
from mlproject.sources import Loaders
from mlproject.sweep import NEVER
from mlproject.task import Task

if TYPE_CHECKING:
    from mlproject.artifacts import RangeTest

log = logging.getLogger(__name__)

AUTO_CANDIDATES = 3  # auto tries the suggestion and its neighbours half a decade below and above
SPACING_DECADES = 0.5  # the quality benchmark's grid: a closer spacing is within one trial's noise of the suggestion
# A trial shorter than this measures the optimizer's warm-up (momentum 0.9 and Adam's first moment average over
# about ten steps), not what the LR is worth over a fit.
MIN_TRIAL_STEPS = 30
# auto verifies a suggestion whose confidence is below full (lr_range: the rule's two ends, steepest descent and
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
    suggestion: lr_range.Suggestion | None = None  # the range test's, moved to `lr` when verification ran

    @property
    def ran(self) -> bool:
        return self.lr is not None

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


def candidate_count(setting: str, suggestion: lr_range.Suggestion, spread: float = 0.0) -> tuple[int, str]:
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


def doubts(suggestion: lr_range.Suggestion, spread: float = 0.0) -> str:
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


def trial_steps(fit_steps: int, fraction: float, count: int) -> tuple[int, str]:
    """Optimizer steps per candidate within `fraction` of the fit's steps for all of them together, or 0 and why."""
    steps = int(fraction * fit_steps) // count
    if steps < MIN_TRIAL_STEPS:
        return 0, (
            f"a budget of {fraction:g} x {fit_steps} fit steps leaves {steps} steps for each of {count} candidates, "
            f"fewer than {MIN_TRIAL_STEPS}"
        )
    return steps, ""


def plan(setting: str, suggestion: lr_range.Suggestion, fit_steps: int, fraction: float, spread: float = 0.0) -> Plan:
    count, why = candidate_count(setting, suggestion, spread)
    if count == 0:
        return Plan((), 0, why, skip=why)
    steps, short = trial_steps(fit_steps, fraction, count)
    found = candidates(suggestion.lr, count)
    return Plan(found, steps, why, skip=short)


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


def moved(
    suggestion: lr_range.Suggestion, lr: float, lrs: Sequence[float], losses: Sequence[float]
) -> lr_range.Suggestion:
    """The suggestion moved to the verified LR, with the one-cycle range the curve gives that LR. A suggestion whose
    range peaks at the LR itself keeps that shape, a tenth of the LR to the LR: a fallback's curve has no floor to
    place a peak by, and one still falling at lr_max (lr_range.guard_edge) has its floor only at the sweep's edge."""
    if suggestion.method == "fallback" or suggestion.lr_high <= suggestion.lr:
        return replace(suggestion, lr=lr, lr_low=lr / 10, lr_high=lr)
    low, high = lr_range.lr_range(lr_range.usable_curve(lrs, losses), lr)
    return replace(suggestion, lr=lr, lr_low=low, lr_high=high)


# --- the trials ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialKit:
    """What the trials need from the job: a fresh module at an LR (seeded as the fit's), fresh loaders (the fit's
    batch order), the hardware, and the figure to score by."""

    lightning: Lightning
    rt: training.Runtime
    make_module: Callable[[float], Any]
    loaders: Callable[[], Loaders]
    monitor: str
    mode: str


def run_trials(kit: TrialKit, chosen: Plan, setting: str) -> Verification:
    """Train every candidate of the plan for its steps and keep the best; a plan with a skip trains nothing."""
    if chosen.skip:
        return Verification(setting, chosen, reason=chosen.skip)
    trials: list[Trial] = []
    for lr in chosen.candidates:
        done = trial(kit, lr, chosen.steps, before=not trials)
        if isinstance(done, str):  # nothing to score the candidates by: the suggestion stands
            return Verification(setting, chosen, tuple(trials), reason=done)
        trials.append(done)
        log.info("verify: lr=%.4g %s=%.4g after %d steps (%.1fs)", lr, kit.monitor, done.score, done.steps,
                 done.seconds)  # fmt: skip
    best = winner(trials, kit.mode, trials[0].before)
    if best is None:
        return Verification(setting, chosen, tuple(trials), reason="every candidate diverged")
    why = f"{kit.monitor} {best.score:.4g} after {chosen.steps} steps, from {trials[0].before:.4g} untrained"
    why += "" if best is trials[0] else f" (the suggestion's: {trials[0].score:.4g})"
    log.info("verify: chose lr=%.6g: %s", best.lr, why)
    return Verification(setting, chosen, tuple(trials), best.lr, why)


class TrialHooks:
    """Ends a trial once its loss is non-finite: every CHECK_EVERY steps the loss is averaged over the ranks, so
    every rank sees the same value and stops at the same step (a rank stopping alone would leave the others
    waiting in the next collective)."""

    CHECK_EVERY = 10  # steps between checks: each is one host sync

    def __init__(self) -> None:
        self.diverged = False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.global_step - 1) % self.CHECK_EVERY:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        if not math.isfinite(float(trainer.strategy.reduce(loss.detach().float(), reduce_op="mean"))):
            self.diverged = trainer.should_stop = True


def trial(kit: TrialKit, lr: float, steps: int, before: bool = False) -> Trial | str:
    """One candidate: `steps` optimizer steps from the seeded module, then one validation pass (with `before`, one
    before training too); or why it cannot be scored. Rank 0's values are every rank's, so every rank picks the
    same winner."""
    start = time.perf_counter()
    module, loaders = kit.make_module(lr), kit.loaders()
    missing = _no_validation(kit.lightning, module, loaders)
    if missing:
        return missing
    hooks = kit.lightning.make(TrialHooks, "Callback")
    trainer = training.build_trainer(kit.lightning, kit.rt, -1, [hooks], max_steps=steps,
                                     check_val_every_n_epoch=NEVER)  # fmt: skip
    untrained = _validate(trainer, module, loaders) if before else {}
    trainer.fit(module, **loaders.fit_kwargs())
    values = {} if hooks.diverged else _validate(trainer, module, loaders)
    if kit.monitor not in values and not hooks.diverged:
        logged = ", ".join(sorted(values)) or "nothing"
        return f"the validation logs no {kit.monitor} to compare the candidates by (it logs {logged})"
    score, first = trainer.strategy.broadcast((values.get(kit.monitor, math.nan), untrained.get(kit.monitor, math.nan)))
    return Trial(lr, score if math.isfinite(score) else math.nan, int(trainer.global_step),
                 time.perf_counter() - start, first)  # fmt: skip


def _validate(trainer: Any, module: Any, loaders: Loaders) -> dict[str, float]:
    found = trainer.validate(module, **_validation_kwargs(loaders), verbose=False)
    return {k: float(v) for k, v in (found[0] if found else {}).items()}


def _validation_kwargs(loaders: Loaders) -> dict[str, Any]:
    return {"datamodule": loaders.datamodule} if loaders.datamodule is not None else {"dataloaders": loaders.val}


def _no_validation(lightning: Lightning, module: Any, loaders: Loaders) -> str:
    """Why no trial can be scored (no validation loop or data), or ""."""
    overridden = importlib.import_module(f"{lightning.name}.utilities.model_helpers").is_overridden
    if not overridden("validation_step", module):
        return f"{type(module).__qualname__} has no validation_step to score the candidates by"
    data = loaders.datamodule
    if (data is None and loaders.val is None) or (data is not None and not overridden("val_dataloader", data)):
        return "the data has no validation set to score the candidates on"
    return ""


# --- the job's call ----------------------------------------------------------------------------------------------


def verify(
    cfg: JobConfig, job: Task, rt: training.Runtime, found: RangeTest, seeded: Callable[..., Any]
) -> Verification:
    """Verify a range test's suggestion as cfg asks (lr_verify, verify_fraction), with trials built like the fit:
    `seeded(cfg, job, rt)` makes the fit's fresh module, job.loaders(cfg.seed, ...) its batches. The trials train at
    a constant LR, or under the module's own schedule when the fit keeps it."""
    s = found.suggestion
    chosen = plan(cfg.lr_verify, s, found.fit_steps, cfg.verify_fraction, found.spread_decades)
    schedule = "module" if cfg.resolved_schedule == "module" else "constant"

    def make_module(lr: float) -> Any:
        module = seeded(cfg, job, rt)
        training.set_lr(job.lightning, module, job.lr_attr, lr)
        training.apply_schedule(module, schedule, lr, 0.0)
        return module

    kit = TrialKit(job.lightning, rt, make_module, lambda: job.loaders(cfg.seed, rt.device.type), cfg.monitor,
                   cfg.monitor_mode)  # fmt: skip
    done = run_trials(kit, chosen, cfg.lr_verify)
    if not done.ran:
        log.info("verify: skipped: %s", done.reason)
        return replace(done, suggestion=s)
    losses = found.curve.probe_losses if cfg.lr_probe else found.curve.losses
    return replace(done, suggestion=moved(s, float(done.lr or 0), found.curve.lrs, losses))
