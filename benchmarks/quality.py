"""Suggestion quality: the regret of each way of choosing the LR, and of each way of training, against a grid of real
trainings.

    python -m benchmarks.quality [--cases lenet-adam-64,tabular] [--train-seeds 5] [--cache FILE]
    python -m benchmarks.quality --survey 20 [--cases lenet-sgd-128-full]
    python -m benchmarks.quality --wall 3

Every case runs once per training seed s (42, 43, ...), as a user's job with seed s would: the range test (seed s),
every way's LR from it, then a constant-LR training of the case's length at each of those LRs and at each LR of a
half-decade grid (3e-5 .. 0.3), from seed s's weights and batch order. The ways of choosing: Lightning's
`suggestion()` (it reads the whole sweep, as its own finder records it), the combined rule before the cliff margin
(commit BEFORE) and now (both read the part the job's sweep, which stops early, runs), and `auto`: the job's own
choice as `lr_verify=auto` makes it, repeating a doubtful range test and verifying it (choose.repeated,
trials.verify). The ways of training, each as it runs: the job (auto's choice under the job's default schedule:
one-cycle for the built-in networks, the module's own for the examples), Schedule-Free AdamW and Prodigy at their
own LR and schedule (by class path, so that they train the examples too). The grid is trained outward from the
combined rule's LR until the figure has fallen by MARGIN on each side of the best (walk_grid).

Regret: for classifiers, the grid's best mean test accuracy minus the arm's mean test accuracy, in points; for
regressions, how much larger the arm's mean test loss is than the grid's best, in percent (the test split, not the
validation split verification chooses by). Each regret comes with its standard error over the training seeds and
the number of seeds that diverged (a diverged classifier scores chance accuracy, a regression the worst finite
loss). A second table: each arm's mean wall time (range tests and verification included), the spread of the chosen
LR over the seeds (decades), how many range tests the job ran and the share of its wall time its repeats and
verification took. Fashion-MNIST from Debian's dataset-fashion-mnist (--data-dir elsewhere); the examples from
examples/. With --survey N, only range tests (survey()); with --wall N, only the default job's wall time with
verification off, auto and forced (job_wall()).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient
from pytorch_lightning.tuner.lr_finder import _LRFinder

from mlproject.catalog import FASHION_MNIST_DIR
from mlproject.config import BUILTIN_LR, JobConfig
from mlproject.errors import TrainingDiverged
from mlproject.finder import choose, rules, trials, verify
from mlproject.finder.result import RangeTest
from mlproject.training import optimizers, runtime, task, trainer
from mlproject.training.classpaths import add_code_path

GRID = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BEFORE = "f2a30fe"  # the commit whose combined rule is the "rule before" column: before the cliff margin
# The ways of choosing, each trained at the case's constant LR, and the ways of training, each as it runs.
WAYS = ("lightning", "rule_before", "combined", "auto")
RUNS = ("job", "schedulefree", "prodigy")
ARMS = WAYS + RUNS
# The LR-free optimizers by class path, so that they train user modules too, at their own LR, under their authors'
# schedule (Prodigy: cosine to the end of the fit; Schedule-Free: none).
LR_FREE_ARMS = {
    "schedulefree": {"optimizer": "schedulefree.AdamWScheduleFree", "schedule": "constant"},
    "prodigy": {"optimizer": "prodigyopt.Prodigy", "schedule": "cosine"},
}
# The grid walk stops on a side once the mean figure there is this much worse than the best: 2 points of accuracy
# (two trainings' noise), 10% of a loss.
MARGIN = {"test_acc": 0.02, "test_loss": 0.10}


@dataclass(frozen=True)
class Case:
    name: str
    params: dict[str, object] = field(hash=False)  # JobConfig fields besides the benchmark's own
    figure: str = "test_acc"  # test_acc (regret in points) or test_loss (relative regret in percent)
    chance: float = 0.1  # a diverged classifier's accuracy


def example(name: str, model: str, data: str, data_args: str) -> dict[str, object]:
    """An example project's module and data module, trained for 3 epochs."""
    found = {"model": f"{name}.{model}", "dataset": f"{name}.{data}", "dataset_args": data_args}
    return {**found, "code": str(EXAMPLES / name), "epochs": 3}


CASES = [
    Case("lenet-adam-64", {"optimizer": "adam", "batch_size": 64, "train_subset": 20000}),
    Case("lenet-sgd-128", {"optimizer": "sgd", "batch_size": 128, "train_subset": 20000}),
    Case("cnn_bn-sgd-256", {"model": "cnn_bn", "optimizer": "sgd", "batch_size": 256, "train_subset": 20000}),
    Case("mlp-sgd-256", {"model": "mlp", "optimizer": "sgd", "batch_size": 256, "train_subset": 20000}),
    # The short fit: one epoch of 2,000 samples (31 steps), the sweep asked for 20 steps
    Case("lenet-sgd-short", {"optimizer": "sgd", "batch_size": 64, "train_subset": 2000, "epochs": 1, "lr_steps": 20}),
    Case("tabular", example("tabular", "TabularRegressor", "SyntheticTabular", '{"samples": 20000}'), "test_loss"),
    Case("sequence-gru", example("sequence", "GRUClassifier", "MajorityTokens", '{"samples": 12000}'), chance=1 / 8),
    Case("transformer", example("transformer", "TinyTransformer", "MarkovChains", '{"samples": 16000}'), chance=1 / 4),
    # Earlier cases, by name
    Case("lenet-adamw-32", {"optimizer": "adamw", "batch_size": 32, "train_subset": 20000}),
    Case("lenet-adam-512", {"optimizer": "adam", "batch_size": 512, "train_subset": 20000}),
    Case("mlp-adam-256", {"model": "mlp", "optimizer": "adam", "batch_size": 256, "train_subset": 20000}),
    Case("lenet-sgd-128-full", {"optimizer": "sgd", "batch_size": 128}),  # 55k, 860 steps
]
DEFAULT_CASES = CASES[:8]


def config(case: Case, seed: int, data_dir: str) -> JobConfig:
    base = {"epochs": 2, "schedule": "constant", "accelerator": "cpu", "auto_lr": True}
    return JobConfig(**{**base, "data_dir": data_dir, **case.params, "seed": seed})  # type: ignore[arg-type]


# --- the ways of choosing --------------------------------------------------------------------------------------


def job_steps(found: RangeTest) -> int:
    """How many of the curve's steps the job's sweep runs before rules.stop_reason stops it."""
    return rules.stop_step(found.curve.lrs, found.curve.losses) or found.curve.steps_run


def lightning_suggestion(found: RangeTest) -> float:
    """Lightning's `suggestion()` on its own record of the whole sweep (its running average of the loss, bias
    corrected, as its _LRCallback keeps it); JobConfig's lr where it has none."""
    curve = found.curve
    finder = _LRFinder("exponential", curve.lr_min, curve.lr_max, curve.steps_requested)
    finder.results = {"lr": curve.lrs, "loss": lightning_losses(curve.losses)}
    return finder.suggestion() or BUILTIN_LR


def lightning_losses(losses: list[float], beta: float = 0.98) -> list[float]:
    """Lightning's finder's record of a sweep (its _LRCallback): the exponential running average of the raw losses,
    bias-corrected by the Trainer's global_step, which has already counted the step: beta^(k + 2) at step k."""
    average, smoothed = 0.0, []
    for step, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta ** (step + 2)))
    return smoothed


def rule(found: RangeTest, module: ModuleType = rules) -> float:
    """The LR the job trains at by the combined rule of `module` (finder/rules.py, or its version before) on the part
    the job's sweep runs: its suggestion, edge-guarded, or the job's fallback."""
    k = module.stop_step(found.curve.lrs, found.curve.losses) or found.curve.steps_run
    curve = module.usable_curve(found.curve.lrs[:k], found.curve.losses[:k])
    ran_to_end = k == found.curve.steps_requested
    fallback = found.suggestion.lr if found.suggestion.method == "fallback" else BUILTIN_LR
    momentum = {"momentum": found.curve.momentum} if module is rules else {}
    s = module.suggest_curve(curve, fallback_lr=fallback, train_steps=found.fit_steps, **momentum)
    return float(module.guard_edge(s, curve, ran_to_end).lr)


@functools.cache
def rules_before() -> ModuleType:
    """mlproject/finder/rules.py as it was at BEFORE, read from git."""
    path = "mlproject/finder/rules.py"
    source = subprocess.run(
        ["git", "-C", str(EXAMPLES.parent), "show", f"{BEFORE}:{path}"], capture_output=True, text=True, check=True
    ).stdout
    module = ModuleType("rules_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{BEFORE}:{path}", "exec"), module.__dict__)
    return module


def job_range_test(cfg: JobConfig, job: task.Task, rt: runtime.Runtime) -> RangeTest:
    """The job's range test run to lr_max; its suggestion as the job's sweep, stopped early, gives it."""
    full = choose.range_test(cfg, job, rt, stop_early=False)
    k = job_steps(full)
    usable = rules.usable_curve(full.curve.lrs[:k], full.curve.losses[:k])
    s = rules.suggest_curve(usable, cfg.lr_method, job.fallback_lr(cfg), full.fit_steps, full.curve.momentum)
    s = rules.guard_edge(s, usable, k == full.curve.steps_requested)  # as choose.range_test
    return RangeTest(full.curve, usable, usable, s, (s.lr,), 0.0, full.fit_steps)


def as_the_job_chooses(cfg: JobConfig, job: task.Task, rt: runtime.Runtime) -> tuple[float, float, float, dict]:
    """choose.choose_lr's choice, recorded nowhere: range tests (repeated where auto repeats them), verification as
    lr_verify=auto does it; (the suggestion, the one-cycle peak, its start, what it cost and did)."""
    start = time.perf_counter()
    found = choose.repeated(cfg, job, rt)
    checked = trials.verify(cfg, job, rt, found)
    s = checked.suggestion if (checked.ran or checked.lowered) and checked.suggestion else found.suggestion
    low = s.lr_low if s.method != "fallback" else 0.0
    cost = {
        "seconds": time.perf_counter() - start,
        "sweeps": len(found.repeat_suggestions),
        "sweep_seconds": found.curve.seconds * len(found.repeat_suggestions),
        "verify_seconds": checked.seconds,
        "verify_steps": checked.steps,
        "verify_note": checked.reason if not checked.ran else "",
        "lowered": checked.lowered,
    }
    return s.lr, s.lr_high, low, cost


# --- trainings, cached -----------------------------------------------------------------------------------------


def train(
    cfg: JobConfig, job: task.Task, rt: runtime.Runtime, lr: float, schedule: str = "constant", low: float = 0.0
) -> dict[str, float]:
    """The case's training from the seed's weights and batches at `lr` (0: the module's own) under `schedule`: test
    figures, seconds, and whether it diverged."""
    start = time.perf_counter()
    module = job.module(cfg.seed, rt.channels_last)
    if lr:
        job.set_lr(module, lr)
    optimizers.apply_schedule(module, schedule, lr or job.own_lr or BUILTIN_LR, low)
    loaders = job.data.loaders(cfg.seed, rt.device.type)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = trainer.fit_and_test(
                job.lightning, module, loaders, rt, epochs=cfg.epochs, sink=lambda e, m: None,
                checkpoint=Path(tmp) / "last.ckpt", keep=lambda path: None, extra=job.callbacks(),
            )  # fmt: skip
        except TrainingDiverged:
            return {"diverged": 1.0, "seconds": time.perf_counter() - start}
    figures = {k: v for k, v in result.test.items() if math.isfinite(v)}
    return {**figures, "diverged": float(len(figures) < len(result.test)), "seconds": time.perf_counter() - start}


class Cache:
    """Results already measured, by key: a rule change retrains only the LRs that changed."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.known: dict[str, Any] = json.loads(path.read_text()) if path and path.exists() else {}

    def get(self, key: str, measure: Callable[[], Any]) -> Any:
        if key not in self.known:
            self.known[key] = measure()
            if self.path:
                self.path.write_text(json.dumps(self.known, indent=1, sort_keys=True))
        return self.known[key]


@dataclass
class Seeded:
    """One training seed's run through a case: each way's LR and each arm's result, and what choosing cost."""

    lrs: dict[str, float | None]  # each way's (constant) LR
    results: dict[str, dict[str, float]]  # by f"{lr:.6g}" for constant trainings, by arm name for the others
    sweep_seconds: float  # one range test
    cost: dict[str, Any]  # the job's choice: range tests, verification (as_the_job_chooses)
    fit_steps: int


def run_seed(case: Case, cfg: JobConfig, job: task.Task, rt: runtime.Runtime, cache: Cache) -> Seeded:
    """Seed s's range test and each way's LR from it; the job's own choice; the trainings at those LRs and of each
    way of training as it runs (the job with its schedule, the LR-free optimizers)."""
    found = job_range_test(cfg, job, rt)
    lrs: dict[str, float | None] = {
        "lightning": lightning_suggestion(found),
        "rule_before": rule(found, rules_before()),
        "combined": rule(found),
    }
    suggested, peak, low, cost = as_the_job_chooses(cfg.replace(schedule="auto"), job, rt)
    lrs["auto"] = suggested
    seeded = Seeded(lrs, {}, found.curve.seconds, cost, found.fit_steps)
    for lr in (v for v in lrs.values() if v):
        trained(case, cfg, job, rt, cache, seeded, lr)
    schedule = cfg.replace(schedule="auto").resolved_schedule
    key = f"{case.name}|job|{cfg.epochs}|{rt.precision}|{schedule}|{peak:.6g}|{low:.6g}|s{cfg.seed}"
    chosen_lr = peak if schedule == "onecycle" else suggested
    seeded.results["job"] = cache.get(key, lambda: train(cfg, job, rt, chosen_lr, schedule, low))
    for name, params in LR_FREE_ARMS.items():
        free = cfg.replace(auto_lr=False, lr=0.0, **params)
        key = f"{case.name}|{name}|{cfg.epochs}|{rt.precision}|s{cfg.seed}"
        seeded.results[name] = cache.get(key, lambda free=free: train(free, task.build(free), rt, 0.0, free.schedule))
    return seeded


def trained(case: Case, cfg: JobConfig, job: task.Task, rt: runtime.Runtime, cache: Cache, seeded: Seeded,
            lr: float) -> None:  # fmt: skip
    name = f"{lr:.6g}"
    key = f"{case.name}|{cfg.epochs}|{rt.precision}|{name}|s{cfg.seed}"
    seeded.results[name] = cache.get(key, lambda: train(cfg, job, rt, lr))


def walk_grid(case: Case, cfgs: list[JobConfig], job: task.Task, rt: runtime.Runtime, cache: Cache,
              runs: list[Seeded]) -> None:  # fmt: skip
    """Train the grid outward from the LR nearest the combined rule's, every seed at each LR, until on each side
    of the best mean the figure has fallen by MARGIN or the grid ends: the figure is unimodal in log LR, so the LRs
    beyond cannot be the best, and most cases need four or five of the nine."""
    start = min(range(len(GRID)), key=lambda i: abs(math.log10(GRID[i] / float(runs[0].lrs["combined"] or 1e-3))))
    done: dict[int, float] = {}

    def mean(i: int) -> float:
        if i not in done:
            for cfg, run in zip(cfgs, runs, strict=True):
                trained(case, cfg, job, rt, cache, run, GRID[i])
            values = [score(case, run.results[f"{GRID[i]:.6g}"], math.inf) for run in runs]
            done[i] = float(np.mean(values)) * (1 if case.figure == "test_acc" else -1)
        return done[i]

    mean(start)
    while True:
        best = max(done, key=done.__getitem__)
        nxt = [_next_on(side, best, done, MARGIN[case.figure] * abs(done[best])) for side in (-1, 1)]
        todo = [i for i in nxt if i is not None]
        if not todo:
            return
        mean(todo[0])


def _next_on(side: int, best: int, done: dict[int, float], margin: float) -> int | None:
    """The next grid index to train on one side of the best, or None when that side is settled."""
    i = best + side
    while 0 <= i < len(GRID) and i in done:
        if done[i] < done[best] - margin:
            return None
        i += side
    return i if 0 <= i < len(GRID) else None


# --- regret ------------------------------------------------------------------------------------------------------


def score(case: Case, result: dict[str, float], worst_loss: float) -> float:
    if case.figure == "test_acc":
        return result.get("test_acc", case.chance) if not result.get("diverged") else case.chance
    return result.get("test_loss", worst_loss) if not result.get("diverged") else worst_loss


@dataclass(frozen=True)
class CaseResult:
    name: str
    fit_steps: int
    best_lr: float
    best: float  # the grid's best mean figure
    regret: dict[str, float]  # by arm
    error: dict[str, float]  # standard error of each regret over the seeds
    diverged: dict[str, int]  # seeds whose training diverged, by arm
    seconds: dict[str, float]  # mean wall time of an arm: choosing (range tests, verification) and training
    spread: dict[str, float]  # decades between the seeds' largest and smallest LR, by way of choosing
    sweeps: float  # range tests the job ran, mean over the seeds
    choose_share: float  # the job's repeats and verification, over its whole wall time (choosing and training)
    note: str


def standard_error(best: np.ndarray, at: np.ndarray) -> float:
    """Of the difference of two means over the seeds (0 with one seed)."""
    return math.sqrt((np.var(best, ddof=1) + np.var(at, ddof=1)) / len(best)) if len(best) > 1 else 0.0


def summarize(case: Case, fit_steps: int, seeds: list[Seeded]) -> CaseResult:
    losses = [r["test_loss"] for s in seeds for r in s.results.values() if math.isfinite(r.get("test_loss", math.nan))]
    worst = max(losses) if losses else math.nan

    def result(s: Seeded, arm: str) -> dict[str, float]:
        return s.results[arm] if arm in RUNS else s.results[f"{float(s.lrs[arm] or 0):.6g}"]

    def values(pick: Callable[[Seeded], dict[str, float]]) -> np.ndarray:
        return np.array([score(case, pick(s), worst) for s in seeds])

    grid = {lr: values(lambda s, lr=lr: s.results[f"{lr:.6g}"]) for lr in GRID if f"{lr:.6g}" in seeds[0].results}
    sign = 1.0 if case.figure == "test_acc" else -1.0
    best_lr = max(grid, key=lambda lr: sign * grid[lr].mean())
    best = grid[best_lr]
    regret, error, diverged, seconds, spread = {}, {}, {}, {}, {}
    for arm in ARMS:
        at = values(lambda s, arm=arm: result(s, arm))
        gap = best.mean() - at.mean() if case.figure == "test_acc" else (at.mean() - best.mean()) / best.mean()
        regret[arm] = 100 * gap
        error[arm] = (100 if case.figure == "test_acc" else 100 / best.mean()) * standard_error(best, at)
        diverged[arm] = sum(bool(result(s, arm).get("diverged")) for s in seeds)
        choosing = [0.0 if arm in LR_FREE_ARMS else s.cost["seconds"] if arm in ("auto", "job") else s.sweep_seconds
                    for s in seeds]  # fmt: skip
        seconds[arm] = float(np.mean([c + result(s, arm)["seconds"] for c, s in zip(choosing, seeds, strict=True)]))
        if arm in WAYS:
            logs = [math.log10(float(s.lrs[arm] or 0)) for s in seeds]
            spread[arm] = max(logs) - min(logs)
    repeats = [s.cost["sweep_seconds"] * (1 - 1 / s.cost["sweeps"]) for s in seeds]  # the sweeps beyond the first
    extra = [r + s.cost["verify_seconds"] for r, s in zip(repeats, seeds, strict=True)]
    share = sum(extra) / sum(s.cost["seconds"] + s.results["job"]["seconds"] for s in seeds)
    notes = sorted({s.cost["verify_note"] for s in seeds if s.cost["verify_note"]})
    sweeps = float(np.mean([s.cost["sweeps"] for s in seeds]))
    return CaseResult(case.name, fit_steps, best_lr, float(best.mean()), regret, error, diverged, seconds, spread,
                      sweeps, share, "; ".join(notes))  # fmt: skip


def run_case(case: Case, seeds: int, cache: Cache, data_dir: str) -> CaseResult:
    cfg = config(case, 42, data_dir)
    add_code_path(cfg.code)
    job, rt = task.build(cfg), runtime.detect_runtime(cfg)
    cfgs = [cfg.replace(seed=42 + k) for k in range(seeds)]
    runs = [run_seed(case, c, job, rt, cache) for c in cfgs]
    for c, run in zip(cfgs, runs, strict=True):
        shown = ", ".join(f"{w}={lr:.6g}" for w, lr in run.lrs.items() if lr)
        print(f"  {case.name} seed {c.seed}: {shown}; {run.cost['sweeps']} range tests", flush=True)
    walk_grid(case, cfgs, job, rt, cache, runs)
    return summarize(case, runs[0].fit_steps, runs)


# --- the tables --------------------------------------------------------------------------------------------------

NAMES = {"lightning": "Lightning's `suggestion()`", "rule_before": "rule before", "combined": "the rule",
         "auto": "auto (repeats, verification)", "job": "the job as it runs", "schedulefree": "Schedule-Free AdamW",
         "prodigy": "Prodigy"}  # fmt: skip


def regret_row(r: CaseResult, unit: str) -> str:
    best = f"{r.best:.4f}" if unit == "points" else f"{r.best:.4g}"
    cells = [f"{r.regret[a]:.2f} ± {r.error[a]:.2f}" + (f" ({r.diverged[a]} diverged)" if r.diverged[a] else "")
             for a in ARMS]  # fmt: skip
    return f"| {r.name} | {r.fit_steps} | {r.best_lr:g}: {best} | " + " | ".join(cells) + " |"


def table(results: list[CaseResult], cases: dict[str, Case]) -> str:
    head = ["case", "fit steps", "grid's best LR: figure", *(NAMES[a] for a in ARMS)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for unit, figure in (("points", "test_acc"), ("percent", "test_loss")):
        chosen = [r for r in results if cases[r.name].figure == figure]
        if not chosen:
            continue
        lines += [regret_row(r, unit) for r in chosen]
        means = [np.mean([r.regret[a] for r in chosen]) for a in ARMS]
        worst = [max(r.regret[a] for r in chosen) for a in ARMS]
        lines.append(f"| mean ({unit}) | | | " + " | ".join(f"{m:.2f}" for m in means) + " |")
        lines.append(f"| worst ({unit}) | | | " + " | ".join(f"{m:.2f}" for m in worst) + " |")
    lines += ["", "| case | " + " | ".join(f"{NAMES[a]} (s)" for a in ARMS) + " | LR spread, rule / auto (decades) "
              "| the job's range tests | its repeats and verification, share of its wall time | why not verified |",
              "|---" * (len(ARMS) + 5) + "|"]  # fmt: skip
    for r in results:
        times = " | ".join(f"{r.seconds[a]:.1f}" for a in ARMS)
        spread = f"{r.spread['combined']:.2f} / {r.spread['auto']:.2f}"
        lines.append(f"| {r.name} | {times} | {spread} | {r.sweeps:g} | {100 * r.choose_share:.0f}% | {r.note} |")
    return "\n".join(lines)


def survey(case: Case, seeds: int, data_dir: str) -> None:
    """Range tests alone, seeds 0 .. seeds-1: each curve's depth, the combined rule's suggestion before and now
    with its confidence now; then the spread of both over the seeds (decades) and how many auto would verify."""
    cfg = config(case, 0, data_dir)
    add_code_path(cfg.code)
    job, rt = task.build(cfg), runtime.detect_runtime(cfg)
    before, now, doubtful = [], [], 0
    for seed in range(seeds):
        found = job_range_test(cfg.replace(seed=seed), job, rt)
        k = job_steps(found)
        drop = rules.depth(rules.usable_curve(found.curve.lrs[:k], found.curve.losses[:k]))
        old, s = rule(found, rules_before()) or math.nan, found.suggestion
        before.append(math.log10(old))
        now.append(math.log10(s.lr))
        doubtful += verify.doubts(s) != ""
        print(f"  {case.name} seed {seed}: depth {drop:.2f}, before {old:.3g}, now {s.lr:.3g} "
              f"(confidence {s.confidence:.2f})", flush=True)  # fmt: skip
    print(f"{case.name}: spread over {seeds} seeds {np.ptp(before):.2f} decades before, {np.ptp(now):.2f} now; "
          f"auto verifies {doubtful} of {seeds}", flush=True)  # fmt: skip


def job_wall(rounds: int, data_dir: str) -> None:
    """The default job (`python -m mlproject train --auto-lr true`, what `mlflow run . -P auto_lr=true` runs) with
    lr_verify off, auto and 3 taking turns (the order reversed every other round): wall seconds from start to
    exit, each against off in the same round, verification's own seconds and the test accuracy."""
    settings = ("off", "auto", "3")
    rows: dict[str, list[tuple[float, float, float]]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "TQDM_DISABLE": "1"}
        for r in range(rounds):
            for setting in settings if r % 2 == 0 else settings[::-1]:
                args = [sys.executable, "-m", "mlproject", "train", "--auto-lr", "true", "--data-dir", data_dir]
                args += ["--lr-verify", setting, "--experiment-name", f"wall-{setting}"]
                start = time.perf_counter()
                subprocess.run(args, env=env, cwd=tmp, check=True, capture_output=True)
                wall = time.perf_counter() - start
                client = MlflowClient(env["MLFLOW_TRACKING_URI"])
                experiment = client.get_experiment_by_name(f"wall-{setting}").experiment_id
                run = client.search_runs([experiment], order_by=["attributes.start_time DESC"], max_results=1)[0]
                rows[setting].append((wall, run.data.metrics["lr_verify_seconds"], run.data.metrics["test_acc"]))
                print(f"  round {r + 1} lr_verify={setting}: {wall:.1f} s, verification "
                      f"{rows[setting][-1][1]:.1f} s, test_acc {rows[setting][-1][2]:.4f}", flush=True)  # fmt: skip
    print("| lr_verify | wall (s) | / off, same round (median) | verification (s) | test accuracy |")
    print("|---|---|---|---|---|")
    for setting in settings:
        walls = [w for w, _, _ in rows[setting]]
        ratio = np.median([w / off for w, (off, _, _) in zip(walls, rows["off"], strict=True)])
        print(f"| {setting} | {', '.join(f'{w:.1f}' for w in walls)} | {ratio:.3f} | "
              f"{np.median([v for _, v, _ in rows[setting]]):.1f} | {rows[setting][0][2]:.4f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(c.name for c in DEFAULT_CASES))
    parser.add_argument("--train-seeds", type=int, default=3, help="seeds per case: range test, verification, fit")
    parser.add_argument("--cache", type=Path, help="JSON file of measured results, read and extended")
    parser.add_argument("--data-dir", default=FASHION_MNIST_DIR)
    parser.add_argument("--survey", type=int, default=0, help="only range tests: N seeds per case (survey())")
    parser.add_argument("--wall", type=int, default=0, help="only the default job's wall time: N rounds (job_wall())")
    args = parser.parse_args()
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    cases = {c.name: c for c in CASES}
    if args.wall:
        job_wall(args.wall, args.data_dir)
        return
    if args.survey:
        for name in args.cases.split(","):
            survey(cases[name], args.survey, args.data_dir)
        return
    cache = Cache(args.cache)
    results = [run_case(cases[name], args.train_seeds, cache, args.data_dir) for name in args.cases.split(",")]
    print(f"\nregret (mean over {args.train_seeds} training seeds ± its standard error)\n")
    print(table(results, cases))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
