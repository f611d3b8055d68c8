"""Verification's trials: each candidate LR trained from the fit's seeded weights and batch order for the plan's
steps, then scored on the validation figure the job monitors (the choices themselves are finder/verify.py's)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from mlproject.config import JobConfig
from mlproject.finder.result import RangeTest
from mlproject.finder.sweep import NEVER
from mlproject.finder.verify import Plan, Trial, Verification, moved, plan, winner
from mlproject.training import lightning_api, trainer
from mlproject.training.lightning_api import Lightning
from mlproject.training.optimizers import apply_schedule
from mlproject.training.runtime import Runtime
from mlproject.training.sources import Loaders
from mlproject.training.task import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialKit:
    """What the trials need from the job: a fresh module at an LR (seeded as the fit's), fresh loaders (the fit's
    batch order), the hardware, and the figure to score by."""

    lightning: Lightning
    rt: Runtime
    make_module: Callable[[float], Any]
    loaders: Callable[[], Loaders]
    monitor: str
    mode: str
    trainer_args: dict[str, Any] = field(default_factory=dict)


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
        log.info(
            "verify: lr=%.4g %s=%.4g after %d steps (%.1fs)", lr, kit.monitor, done.score, done.steps, done.seconds
        )
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
    missing = _no_validation(module, loaders)
    if missing:
        return missing
    hooks = kit.lightning.make(TrialHooks, "Callback")
    fitter = trainer.build_trainer(
        kit.lightning, kit.rt, -1, [hooks], kit.trainer_args, max_steps=steps, check_val_every_n_epoch=NEVER
    )
    untrained = _validate(fitter, module, loaders) if before else {}
    fitter.fit(module, **loaders.fit_kwargs())
    values = {} if hooks.diverged else _validate(fitter, module, loaders)
    if kit.monitor not in values and not hooks.diverged:
        logged = ", ".join(sorted(values)) or "nothing"
        return f"the validation logs no {kit.monitor} to compare the candidates by (it logs {logged})"
    score, first = fitter.strategy.broadcast((values.get(kit.monitor, math.nan), untrained.get(kit.monitor, math.nan)))
    seconds = time.perf_counter() - start
    return Trial(lr, score if math.isfinite(score) else math.nan, int(fitter.global_step), seconds, first)


def _validate(fitter: Any, module: Any, loaders: Loaders) -> dict[str, float]:
    found = fitter.validate(module, **loaders.validation_kwargs(), verbose=False)
    return {k: float(v) for k, v in (found[0] if found else {}).items()}


def _no_validation(module: Any, loaders: Loaders) -> str:
    """Why no trial can be scored (no validation loop or data), or ""."""
    if not lightning_api.defines(type(module), "validation_step"):
        return f"{type(module).__qualname__} has no validation_step to score the candidates by"
    if not loaders.has_validation():
        return "the data has no validation set to score the candidates on"
    return ""


def verify(cfg: JobConfig, job: Task, rt: Runtime, found: RangeTest) -> Verification:
    """Verify a range test's suggestion as cfg asks (lr_verify, verify_fraction), with trials built like the fit: the
    fit's seeded module and batch order. The trials train at a constant LR, or under the module's own schedule when
    the fit keeps it."""
    suggestion = found.suggestion
    chosen = plan(cfg.lr_verify, suggestion, found.fit_steps, cfg.verify_fraction, found.spread_decades)
    schedule = "module" if cfg.resolved_schedule == "module" else "constant"

    def make_module(lr: float) -> Any:
        module = job.module(cfg.seed, rt.channels_last)
        job.set_lr(module, lr)
        apply_schedule(module, schedule, lr, 0.0)
        return module

    loaders = lambda: job.data.loaders(cfg.seed, rt.device.type)  # noqa: E731
    kit = TrialKit(job.lightning, rt, make_module, loaders, cfg.monitor, cfg.monitor_mode, job.trainer_args)
    done = run_trials(kit, chosen, cfg.lr_verify)
    if chosen.lower:
        safer = chosen.candidates[1]
        log.warning("verify: %s; %s: the lower candidate %.4g is taken untried", chosen.reason, done.reason, safer)
        lowered = moved(suggestion, safer, found.signal)
        why = f"; too short to verify ({done.reason}): the candidate below, {safer:.3g}, taken untried"
        return replace(done, suggestion=replace(lowered, reason=lowered.reason + why))
    if done.lr is None:
        log.info("verify: skipped: %s", done.reason)
        return replace(done, suggestion=suggestion)
    return replace(done, suggestion=moved(suggestion, done.lr, found.signal))
