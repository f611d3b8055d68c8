"""The finder's one entry point, as `Tuner.lr_find` is Lightning's: choose_lr() runs the range test (lr_repeats
times), reads its suggestion, verifies a doubtful one by trial fits, records all of it in the run and hands the fit
an LRChoice."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

from mlproject import progress
from mlproject.config import JobConfig
from mlproject.finder import records, rules, sweep, trials, verify
from mlproject.finder.result import LRChoice, RangeTest
from mlproject.record.tracker import Tracker
from mlproject.training.runtime import Runtime
from mlproject.training.task import Task

log = logging.getLogger(__name__)

SPREAD_WARNING = 0.3  # decades between repeated range tests beyond which the suggestion is called uncertain
# On small data the range test could cost several fits (and its curve would measure memorisation): it takes at most
# this share of the fit's optimizer steps, but keeps MIN_PER_DECADE steps a decade of its LR range: sparser, the
# smoothing (rules.SMOOTH_DECADES, 0.2 decades) spans under two points and a noisy step reads as divergence.
SWEEP_SHARE = 0.5
MIN_PER_DECADE = 8
# A doubtful suggestion under lr_verify=auto is read from the median of this many range tests (other seeds): 3 cut
# the default job's spread between seeds from 0.21 to 0.12 decades (benchmarks/RESULTS.md).
AUTO_REPEATS = 3


def choose_lr(cfg: JobConfig, job: Task, rt: Runtime, tracker: Tracker) -> LRChoice:
    """Sweep, suggest, verify, record; with no usable sweep the fallback is job.fallback_lr(cfg) (lr, the module's
    own, or BUILTIN_LR), its reason recorded."""
    found = repeated(cfg, job, rt)
    s, curve = found.suggestion, found.curve
    source = "fallback" if s.method == "fallback" else "finder"
    stop = f"stopped: {curve.stop_reason}" if curve.stop_reason else "ran to lr_max"
    log.info(
        "range test: %d of %d steps in %.2f s (%s); %s lr=%.4g (%s)",
        curve.steps_run,
        curve.steps_requested,
        curve.seconds,
        stop,
        source,
        s.lr,
        s.reason,
    )
    checked = trials.verify(cfg, job, rt, found)
    if checked.ran and checked.suggestion is not None:
        s, source = checked.suggestion, "verified"
    elif checked.lowered and checked.suggestion is not None:
        s = checked.suggestion  # the finder's, one step lower: the reason says so
    onecycle = cfg.resolved_schedule == "onecycle"
    lr = s.lr_high if onecycle else s.lr
    low = s.lr_low if onecycle and source != "fallback" else 0.0
    choice = LRChoice(lr, source, low, found, checked)
    # With a probe, what the training-loss curve alone would have said, for comparison.
    fallback = job.fallback_lr(cfg)
    train_curve = (
        rules.suggest_curve(found.usable, cfg.lr_method, fallback, found.fit_steps, found.curve.momentum).lr
        if cfg.lr_probe
        else None
    )
    records.record(tracker, cfg, choice, train_curve)
    return choice


def repeated(cfg: JobConfig, job: Task, rt: Runtime) -> RangeTest:
    """lr_repeats range tests under successive seeds: the median suggestion's, with every repeat's and their spread.
    Under lr_verify=auto, a single range test whose suggestion is doubtful (verify.doubts) is repeated AUTO_REPEATS
    times in all, where the repeats fit in the range test's share of the fit (SWEEP_SHARE)."""
    tests = [range_test(cfg.replace(seed=cfg.seed + r), job, rt) for r in range(cfg.lr_repeats)]
    more, why = auto_repeats(cfg, tests[0])
    if more:
        log.info("range test: %d more with other seeds: %s", more, why)
        tests += [range_test(cfg.replace(seed=cfg.seed + r), job, rt) for r in range(1, 1 + more)]
    answered = [t for t in tests if t.suggestion.method != "fallback"] or tests
    median = sorted(answered, key=lambda t: t.suggestion.lr)[(len(answered) - 1) // 2]  # its curve is the one plotted
    spread = spread_decades([t.suggestion.lr for t in answered])
    if spread > SPREAD_WARNING:
        log.warning("the %d range tests disagree by %.2f decades: the suggestion is uncertain", len(tests), spread)
    repeats = tuple(t.suggestion.lr for t in tests)
    return replace(median, repeat_suggestions=repeats, spread_decades=spread)


def auto_repeats(cfg: JobConfig, first: RangeTest) -> tuple[int, str]:
    """How many more range tests auto runs after `first` (0: none), and why: lr_verify=auto, lr_repeats left at 1,
    a doubtful suggestion, and room for AUTO_REPEATS sweeps in SWEEP_SHARE of the fit."""
    if cfg.lr_verify != "auto" or cfg.lr_repeats != 1:
        return 0, ""
    doubt = verify.doubts(first.suggestion)
    steps = first.curve.steps_requested
    if not doubt or AUTO_REPEATS * steps > SWEEP_SHARE * first.fit_steps:
        return 0, ""
    return AUTO_REPEATS - 1, f"{doubt}; the median of {AUTO_REPEATS} is used"


def range_test(cfg: JobConfig, job: Task, rt: Runtime, stop_early: bool = True) -> RangeTest:
    """One range test on a fresh module under cfg.seed; with lr_probe the suggestion comes from the held-out probe's
    curve."""
    budget, why = sweep_steps(cfg.lr_steps, fit_steps(cfg, job, rt), math.log10(cfg.lr_max / cfg.lr_min))
    if why:
        log.info("range test: %s", why)
    progress.sweep_start(cfg.lr_min, cfg.lr_max, budget, shown=True)
    module = job.module(cfg.seed, rt.channels_last)
    probe = job.data.probe(rt.device) if cfg.lr_probe and job.data.probe else None
    inputs = job.data.loaders(cfg.seed + 1, rt.device.type).sweep_kwargs()
    curve = sweep.range_test(
        module,
        inputs,
        lightning=job.lightning,
        rt=rt,
        lr_min=cfg.lr_min,
        lr_max=cfg.lr_max,
        steps=budget,
        probe=probe,
        stop_early=stop_early,
        trainer_args=job.trainer_args,
    )
    steps = fit_steps(cfg, job, rt, curve.batches_per_epoch)
    usable = rules.usable_curve(curve.lrs, curve.losses)
    signal = rules.usable_curve(curve.lrs, curve.probe_losses) if cfg.lr_probe else usable
    suggestion = rules.suggest_curve(signal, cfg.lr_method, job.fallback_lr(cfg), steps, curve.momentum)
    suggestion = rules.guard_edge(suggestion, signal, curve.steps_run == curve.steps_requested)
    if suggestion.confidence == 0.0 and suggestion.method != "fallback":
        log.warning("range test: %s", suggestion.reason)
    return RangeTest(curve, usable, signal, suggestion, (suggestion.lr,), 0.0, steps, cfg.lr_steps)


def sweep_steps(asked: int, fit: int, decades: float) -> tuple[int, str]:
    """The range test's steps over `decades` of LR: as asked, but MIN_PER_DECADE a decade at least (a sparser curve
    cannot be read) and at most SWEEP_SHARE of the fit's `fit` optimizer steps (0: unknown) beyond that; and why
    not as asked ("" when as asked)."""
    least = max(2 * rules.MIN_POINTS, math.ceil(MIN_PER_DECADE * decades))  # a curve's cut leaves MIN_POINTS
    if asked < least:
        return least, (
            f"{least} steps, not lr_steps={asked}: {asked / decades:.1f} steps a decade of LR cannot be read (the "
            f"smoothing spans {rules.SMOOTH_DECADES} decades, a momentum buffer about ten steps); {MIN_PER_DECADE} a "
            "decade at least"
        )
    cap = max(least, int(SWEEP_SHARE * fit)) if fit else asked
    if asked <= cap:
        return asked, ""
    return cap, (
        f"{cap} steps, not lr_steps={asked}: a range test takes at most {SWEEP_SHARE:.0%} of the fit's {fit} steps, "
        f"and {least} at least ({MIN_PER_DECADE} a decade, {2 * rules.MIN_POINTS} in all); the same LRs, read more "
        "coarsely"
    )


def fit_steps(cfg: JobConfig, job: Task, rt: Runtime, batches_per_epoch: int = 0) -> int:
    """Optimizer steps of the fit on each rank: what the combined rule weighs (and the one-cycle's length)."""
    per_epoch = job.data.steps_per_epoch(rt.world_size) or batches_per_epoch
    return cfg.epochs * per_epoch // cfg.accumulate_grad_batches


def spread_decades(lrs: list[float]) -> float:
    """Decades between the largest and the smallest suggestion (0 for a single sweep)."""
    logs = [math.log10(lr) for lr in lrs if lr > 0]
    return max(logs) - min(logs) if logs else 0.0
