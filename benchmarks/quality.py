"""Suggestion quality: the regret of each way of choosing the LR against a grid of real trainings.

    python -m benchmarks.quality [--cases lenet-adam-64,tabular] [--train-seeds 3] [--cache FILE]
    python -m benchmarks.quality --survey 20 [--cases lenet-sgd-128-full]
    python -m benchmarks.quality --wall 3

Every case runs the whole choice once per training seed s (42, 43, ...), as a user's job with seed s would: the range
test (seed s), every way's LR from it, then a constant-LR training of the case's length at each of those LRs and at
each LR of a half-decade grid (3e-5 .. 0.3), from seed s's weights and batch order. The ways: Lightning's
`suggestion()` (it reads the whole sweep, as its own finder records it), the combined rule as it was at commit
BEFORE (`rule_before`) and as it is now (both read the part the job's sweep, which stops early, runs),
and verification with `lr_verify=3` at the default `verify_fraction` (`verify.verify`, the job's own call).
The grid is trained outward from the combined rule's LR until the figure has fallen by MARGIN on each side of the
best (walk_grid).

Regret: for classifiers, the grid's best mean test accuracy minus the mean test accuracy of the way's LRs, in
points; for regressions, how much larger the mean test loss is than the grid's best, in percent (the test split,
not the validation split verification chooses by). Each regret comes with its standard error over the training
seeds. A training that diverges scores chance accuracy (a regression: the grid's worst finite loss). Also printed:
the spread of each way's LR over the seeds (decades), and verification's seconds against the range test's and the
fit's. Fashion-MNIST from Debian's dataset-fashion-mnist (--data-dir elsewhere); the examples from examples/.
With --survey N, only range tests (survey()): each curve's depth and suggestion over N seeds, before and now.
With --wall N, only the default job's wall time with verification off, auto and forced (job_wall()).
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
BEFORE = "93373d6"  # the commit whose combined rule is the "rule before" column
WAYS = ("lightning", "rule_before", "combined", "verified")
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
    return {"model": f"{name}.{model}", "dataset": f"{name}.{data}", "dataset_args": data_args,
            "code": str(EXAMPLES / name), "epochs": 3}  # fmt: skip


CASES = [
    Case("lenet-adam-64", {"optimizer": "adam", "batch_size": 64, "train_subset": 20000}),
    Case("lenet-adamw-32", {"optimizer": "adamw", "batch_size": 32, "train_subset": 20000}),
    Case("lenet-sgd-128", {"optimizer": "sgd", "batch_size": 128, "train_subset": 20000}),
    Case("lenet-adam-512", {"optimizer": "adam", "batch_size": 512, "train_subset": 20000}),
    Case("mlp-adam-256", {"model": "mlp", "optimizer": "adam", "batch_size": 256, "train_subset": 20000}),
    Case("cnn_bn-sgd-256", {"model": "cnn_bn", "optimizer": "sgd", "batch_size": 256, "train_subset": 20000}),
    Case("lenet-sgd-128-full", {"optimizer": "sgd", "batch_size": 128}),  # the held-back case: 55k, 860 steps
    Case("tabular", example("tabular", "TabularRegressor", "SyntheticTabular", '{"samples": 20000}'), "test_loss"),
    Case("sequence-gru", example("sequence", "GRUClassifier", "MajorityTokens", '{"samples": 12000}'), chance=1 / 8),
    Case("transformer", example("transformer", "TinyTransformer", "MarkovChains", '{"samples": 16000}'), chance=1 / 4),
]


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
    """Lightning's finder's record of a sweep: the exponential running average of the raw losses, bias-corrected."""
    average, smoothed = 0.0, []
    for step, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta ** (step + 1)))
    return smoothed


def rule(found: RangeTest, module: ModuleType = rules) -> float:
    """The LR the job trains at by the combined rule of `module` (finder/rules.py, or its version before) on the part
    the job's sweep runs: its suggestion (edge-guarded where `module` has guard_edge), or JobConfig's lr where it
    falls back."""
    k = module.stop_step(found.curve.lrs, found.curve.losses) or found.curve.steps_run
    lrs, losses = found.curve.lrs[:k], found.curve.losses[:k]
    ran_to_end = k == found.curve.steps_requested
    if module is rules:
        curve = rules.usable_curve(lrs, losses)
        return rules.guard_edge(rules.suggest_curve(curve, train_steps=found.fit_steps), curve, ran_to_end).lr
    s = module.suggest(lrs, losses, train_steps=found.fit_steps)
    if hasattr(module, "guard_edge"):  # the version before took the raw curve
        s = module.guard_edge(s, lrs, losses, ran_to_end)
    return float(s.lr)


@functools.cache
def rules_before() -> ModuleType:
    """mlproject/lr_range.py as it was at BEFORE, read from git."""
    source = subprocess.run(["git", "-C", str(EXAMPLES.parent), "show", f"{BEFORE}:mlproject/lr_range.py"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    module = ModuleType("lr_range_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{BEFORE}:mlproject/lr_range.py", "exec"), module.__dict__)
    return module


def job_range_test(cfg: JobConfig, job: task.Task, rt: runtime.Runtime) -> RangeTest:
    """The job's range test run to lr_max; its suggestion as the job's sweep, stopped early, gives it."""
    full = choose.range_test(cfg, job, rt, stop_early=False)
    k = job_steps(full)
    usable = rules.usable_curve(full.curve.lrs[:k], full.curve.losses[:k])
    s = rules.suggest_curve(usable, cfg.lr_method, cfg.lr, full.fit_steps)
    s = rules.guard_edge(s, usable, k == full.curve.steps_requested)  # as choose.range_test
    return RangeTest(full.curve, usable, usable, s, (s.lr,), 0.0, full.fit_steps)


# --- trainings, cached -----------------------------------------------------------------------------------------


def train(cfg: JobConfig, job: task.Task, rt: runtime.Runtime, lr: float) -> dict[str, float]:
    """The case's constant-LR training from the seed's weights and batches: test figures and seconds."""
    start = time.perf_counter()
    module = job.module(cfg.seed, rt.channels_last)
    job.set_lr(module, lr)
    optimizers.apply_schedule(module, "constant", lr, 0.0)
    loaders = job.data.loaders(cfg.seed, rt.device.type)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = trainer.fit_and_test(job.lightning, module, loaders, rt, epochs=cfg.epochs,
                                           sink=lambda e, m: None, checkpoint=Path(tmp) / "last.ckpt",
                                           keep=lambda path: None)  # fmt: skip
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
    """One training seed's run through a case: each way's LR, each LR's result, verification's cost."""

    lrs: dict[str, float | None]
    results: dict[str, dict[str, float]]  # by f"{lr:.6g}"
    sweep_seconds: float
    verify_seconds: float
    verify_steps: int
    verify_reason: str
    fit_steps: int


def run_seed(case: Case, cfg: JobConfig, job: task.Task, rt: runtime.Runtime, cache: Cache) -> Seeded:
    """Seed s's range test, each way's LR from it, and the trainings at those LRs."""
    found = job_range_test(cfg, job, rt)
    lrs: dict[str, float | None] = {
        "lightning": lightning_suggestion(found),
        "rule_before": rule(found, rules_before()),
        "combined": rule(found),
    }
    plan = verify.plan("3", found.suggestion, found.fit_steps, cfg.verify_fraction)
    key = f"{case.name}|trial|{rt.precision}|s{cfg.seed}|" + ",".join(f"{c:.6g}" for c in plan.candidates)
    key += f"|{plan.steps}"

    def measure() -> dict[str, Any]:
        done = trials.verify(cfg.replace(lr_verify="3"), job, rt, found)
        return {"seconds": done.seconds, "steps": done.steps, "reason": done.reason,
                "scores": [t.score for t in done.trials], "start": done.start}  # fmt: skip

    checked = cache.get(key, measure)
    scored = zip(plan.candidates, checked["scores"], strict=False)  # fewer scores: the trials stopped with a reason
    tried = [verify.Trial(lr, score, plan.steps, 0.0) for lr, score in scored]
    best = verify.winner(tried, cfg.monitor_mode, checked["start"])  # the job's own choice, from the cached scores
    lrs["verified"] = best.lr if best else lrs["combined"]  # skipped: the suggestion stands
    seeded = Seeded(lrs, {}, found.curve.seconds, checked["seconds"], checked["steps"], checked["reason"],
                    found.fit_steps)  # fmt: skip
    for lr in [*(v for v in lrs.values() if v), *(plan.candidates if checked["steps"] else ())]:
        trained(case, cfg, job, rt, cache, seeded, lr)  # every candidate too: what each winner rule would get
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
    regret: dict[str, float]
    error: dict[str, float]  # standard error of each regret over the seeds
    spread: dict[str, float]  # decades between the seeds' largest and smallest LR
    verify_share: float  # verification's seconds over the range test's and the fit's
    verify_steps: int
    verify_note: str


def standard_error(best: np.ndarray, at: np.ndarray) -> float:
    """Of the difference of two means over the seeds (0 with one seed)."""
    return math.sqrt((np.var(best, ddof=1) + np.var(at, ddof=1)) / len(best)) if len(best) > 1 else 0.0


def summarize(case: Case, fit_steps: int, seeds: list[Seeded]) -> CaseResult:
    losses = [r["test_loss"] for s in seeds for r in s.results.values() if math.isfinite(r.get("test_loss", math.nan))]
    worst = max(losses) if losses else math.nan

    def values(pick: Callable[[Seeded], float]) -> np.ndarray:
        return np.array([score(case, s.results[f"{pick(s):.6g}"], worst) for s in seeds])

    grid = {lr: values(lambda s, lr=lr: lr) for lr in GRID if f"{lr:.6g}" in seeds[0].results}
    sign = 1.0 if case.figure == "test_acc" else -1.0
    best_lr = max(grid, key=lambda lr: sign * grid[lr].mean())
    best = grid[best_lr]
    regret, error, spread = {}, {}, {}
    for way in WAYS:
        if any(s.lrs[way] is None for s in seeds):
            continue
        at = values(lambda s, way=way: float(s.lrs[way] or 0))
        gap = best.mean() - at.mean() if case.figure == "test_acc" else (at.mean() - best.mean()) / best.mean()
        regret[way] = 100 * gap
        scale = 100 if case.figure == "test_acc" else 100 / best.mean()
        error[way] = scale * standard_error(best, at)
        logs = [math.log10(float(s.lrs[way] or 0)) for s in seeds]
        spread[way] = max(logs) - min(logs)
    fit = sum(s.results[f"{float(s.lrs['verified'] or 0):.6g}"]["seconds"] for s in seeds)
    share = sum(s.verify_seconds for s in seeds) / (fit + sum(s.sweep_seconds for s in seeds))
    notes = sorted({s.verify_reason for s in seeds if s.verify_steps == 0})
    return CaseResult(case.name, fit_steps, best_lr, float(best.mean()), regret, error, spread, share,
                      int(np.mean([s.verify_steps for s in seeds])), "; ".join(notes))  # fmt: skip


def run_case(case: Case, seeds: int, cache: Cache, data_dir: str) -> CaseResult:
    cfg = config(case, 42, data_dir)
    add_code_path(cfg.code)
    job, rt = task.build(cfg), runtime.detect_runtime(cfg)
    cfgs = [cfg.replace(seed=42 + k) for k in range(seeds)]
    runs = [run_seed(case, c, job, rt, cache) for c in cfgs]
    for c, run in zip(cfgs, runs, strict=True):
        shown = ", ".join(f"{w}={lr:.6g}" for w, lr in run.lrs.items() if lr)
        print(f"  {case.name} seed {c.seed}: {shown}", flush=True)
    walk_grid(case, cfgs, job, rt, cache, runs)
    return summarize(case, runs[0].fit_steps, runs)


# --- the table ---------------------------------------------------------------------------------------------------


def row(r: CaseResult, unit: str) -> str:
    cells = [f"{r.regret[w]:.2f} ± {r.error[w]:.2f}" if w in r.regret else "none" for w in WAYS]
    best = f"{r.best:.4f}" if unit == "points" else f"{r.best:.4g}"
    note = f" ({r.verify_note})" if r.verify_note else ""
    spread = f"{r.spread.get('combined', math.nan):.2f} / {r.spread.get('verified', math.nan):.2f}"
    return (f"| {r.name} | {r.fit_steps} | {r.best_lr:g}: {best} | " + " | ".join(cells)
            + f" | {spread} | {r.verify_steps}, {100 * r.verify_share:.0f}%{note} |")  # fmt: skip


def table(results: list[CaseResult], cases: dict[str, Case]) -> str:
    head = ["case", "fit steps", "grid's best LR: figure", "Lightning", "rule before", "combined", "verified (3)",
            "LR spread, combined / verified (decades)", "verification: steps, time share"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for unit, figure in (("points", "test_acc"), ("percent", "test_loss")):
        chosen = [r for r in results if cases[r.name].figure == figure]
        if not chosen:
            continue
        lines += [row(r, unit) for r in chosen]
        means = [np.mean([r.regret[w] for r in chosen if w in r.regret]) for w in WAYS]
        worst = [max(r.regret[w] for r in chosen if w in r.regret) for w in WAYS]
        lines.append(f"| mean ({unit}) | | | " + " | ".join(f"{m:.2f}" for m in means) + " | | |")
        lines.append(f"| worst ({unit}) | | | " + " | ".join(f"{m:.2f}" for m in worst) + " | | |")
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
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
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
