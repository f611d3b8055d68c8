"""Suggestion quality: regret of each suggester against a grid of real trainings, Lightning's included.

    python -m benchmarks.quality [--epochs 2] [--cases lenet-adam-64,mlp-adam-256] [--seeds 5] [--train-seeds 2]

For each case: one range test (seed 42), every rule's suggestion and Lightning's `suggestion()` on the same
sweep (Lightning reads all of it, as its own finder would record it; the rules read the part the job's sweep,
which stops early, would have run: the same steps, cut short); then a constant-LR training at each LR of a
half-decade grid (3e-5 .. 0.3) and at each suggested LR, same epochs, each LR trained with the same
`--train-seeds` seeds (42, 43, ...: weights and batch order) and its test accuracy averaged over them.
Regret = best mean test accuracy of the grid minus the mean test accuracy at the suggestion, in points.
The noise of one training is printed too: the median absolute difference between two seeds' accuracies at
the same grid LR (over the LRs where both trained).
`--seeds N` also repeats the range test of the first case over N seeds and prints the spread in decades.
All cases use Fashion-MNIST (Debian's dataset-fashion-mnist); --data-dir points elsewhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pytorch_lightning.tuner.lr_finder import _LRFinder

from mlproject import data, lr_range, pipeline, sweep, training
from mlproject.config import JobConfig
from mlproject.errors import TrainingDiverged
from mlproject.model import OptimSpec

GRID = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
RULES = ("combined", "steepest", "valley", "minimum")


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    optimizer: str
    batch_size: int
    train_subset: int = 0  # 0: all 55k


CASES = [
    Case("lenet-adam-64", "lenet", "adam", 64),
    Case("lenet-adamw-32", "lenet", "adamw", 32),
    Case("lenet-sgd-128", "lenet", "sgd", 128),
    Case("lenet-adam-512", "lenet", "adam", 512),
    Case("mlp-adam-256", "mlp", "adam", 256),
    Case("cnn_bn-sgd-256", "cnn_bn", "sgd", 256, train_subset=20000),
]


def config(case: Case, epochs: int, seed: int = 42, train_subset: int = 0) -> JobConfig:
    return JobConfig(
        model=case.model, optimizer=case.optimizer, batch_size=case.batch_size,
        train_subset=case.train_subset or train_subset,
        epochs=epochs, schedule="constant", seed=seed, accelerator="cpu", precision="32-true",
    )  # fmt: skip


def sweep_once(cfg: JobConfig, ds: data.Dataset, rt: training.Runtime) -> sweep.LRCurve:
    """The job's own range test, run to lr_max (or Lightning's 4x stop) without the job's early stop."""
    return pipeline.one_sweep(cfg, ds, rt, stop_early=False)[0]


def job_steps(curve: sweep.LRCurve) -> int:
    """How many of the curve's steps the job's sweep runs before lr_range.stop_reason stops it."""
    return lr_range.stop_step(curve.lrs, curve.losses) or curve.steps_run


def lightning_suggestion(curve: sweep.LRCurve) -> float | None:
    finder = _LRFinder("exponential", curve.lr_min, curve.lr_max, curve.steps_requested)
    finder.results = {"lr": curve.lrs, "loss": curve.lightning_losses}
    return finder.suggestion()


def suggestions(curve: sweep.LRCurve, train_steps: int) -> dict[str, float | None]:
    found: dict[str, float | None] = {}
    k = job_steps(curve)
    for rule in RULES:
        s = lr_range.suggest(curve.lrs[:k], curve.losses[:k], rule, train_steps=train_steps)
        found[rule] = s.lr if s.method != "fallback" else None
    found["lightning"] = lightning_suggestion(curve)
    return found


def test_acc(cfg: JobConfig, ds: data.Dataset, rt: training.Runtime, lr: float) -> float:
    train, val, test = pipeline.fit_batches(cfg, ds, rt)
    module = pipeline.build_classifier(cfg, rt, OptimSpec(cfg.optimizer, lr))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = training.fit_and_test(
                module, train, val, test, rt, cfg.epochs, lambda e, m: None, Path(tmp) / "last.ckpt"
            )
        except TrainingDiverged:
            return 0.1  # a diverged network guesses: chance level on 10 classes
    acc = result.test["test_acc"]
    return acc if math.isfinite(acc) else 0.1


class Cache:
    """Test accuracies already measured, keyed by case, epochs, subset and LR: a rule change needs no new grid."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.known: dict[str, float] = json.loads(path.read_text()) if path and path.exists() else {}

    def acc(self, case: Case, cfg: JobConfig, ds: data.Dataset, rt: training.Runtime, lr: float) -> float:
        key = f"{case.name}|{cfg.epochs}|{cfg.train_subset}|{lr:.6g}" + (f"|s{cfg.seed}" if cfg.seed != 42 else "")
        if key not in self.known:
            self.known[key] = test_acc(cfg, ds, rt, lr)
            if self.path:
                self.path.write_text(json.dumps(self.known, indent=1, sort_keys=True))
        return self.known[key]


def run_case(
    case: Case, epochs: int, source: data.Source, train_subset: int, cache: Cache, train_seeds: int
) -> tuple[dict[str, float | None], float, dict[str, float]]:
    """Each rule's regret on this case, the noise of one training (points) measured on the grid, and each
    regret's standard error over the training seeds (the best grid LR's mean and the suggestion's)."""
    cfg = config(case, epochs, train_subset=train_subset)
    ds = pipeline.load_data(cfg, source)
    rt = training.detect_runtime(cfg, ds.train.images.numel())
    curve = sweep_once(cfg, ds, rt)
    print(f"  {case.name}: the job's sweep runs {job_steps(curve)} of {curve.steps_run} steps", flush=True)
    found = suggestions(curve, pipeline.fit_steps(cfg, ds))
    seeds = [cfg.replace(seed=42 + k) for k in range(train_seeds)]

    def seed_accs(lr: float) -> np.ndarray:
        return np.array([cache.acc(case, c, ds, rt, lr) for c in seeds])

    accs = {lr: seed_accs(lr) for lr in GRID}
    noise = float("nan")
    if train_seeds > 1:
        pairs = [(a[0], a[1]) for a in accs.values()]
        noise = 100 * float(np.median([abs(a - b) for a, b in pairs if min(a, b) > 0.5]))  # both trained
    best = accs[max(GRID, key=lambda lr: float(accs[lr].mean()))]
    regrets: dict[str, float | None] = {}
    errors: dict[str, float] = {}
    for name, lr in found.items():
        if lr is None:
            regrets[name] = None
            continue
        at = seed_accs(lr)
        regrets[name] = 100 * float(best.mean() - at.mean())
        errors[name] = standard_error(best, at)
        print(f"  {case.name}: {name:9s} lr={lr:.3g} acc={at.mean():.4f} regret={regrets[name]:.2f} "
              f"± {errors[name]:.2f}", flush=True)  # fmt: skip
    grid = ", ".join(f"{lr:g}:{a.mean():.4f}" for lr, a in accs.items())
    print(f"  {case.name}: grid {grid}; one training's noise {noise:.2f} points", flush=True)
    return regrets, noise, errors


def standard_error(best: np.ndarray, at: np.ndarray) -> float:
    """Standard error (points) of a regret: the difference of two means over the training seeds."""
    if len(best) < 2:
        return float("nan")
    return 100 * math.sqrt((np.var(best, ddof=1) + np.var(at, ddof=1)) / len(best))


def spread(case: Case, seeds: int, source: data.Source, epochs: int) -> dict[str, float]:
    """Decades between the largest and smallest suggestion over `seeds` range tests (seeds 0 .. seeds-1), and,
    as "combined, median of 3", the same for the job's lr_repeats=3: the median of each of `seeds` groups of
    three further range tests."""
    cfg = config(case, epochs)
    ds = pipeline.load_data(cfg, source)
    rt = training.detect_runtime(cfg, ds.train.images.numel())
    steps = pipeline.fit_steps(cfg, ds)
    values: dict[str, list[float]] = {}
    for seed in range(seeds):
        for name, lr in suggestions(sweep_once(cfg.replace(seed=seed), ds, rt), steps).items():
            if lr is not None:
                values.setdefault(name, []).append(math.log10(lr))
    for group in range(seeds):
        first = seeds + 3 * group
        three = [suggestions(sweep_once(cfg.replace(seed=first + k), ds, rt), steps)["combined"] for k in range(3)]
        values.setdefault("combined, median of 3", []).append(math.log10(float(np.median([lr or 0 for lr in three]))))
    return {name: float(np.ptp(v)) for name, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--train-seeds", type=int, default=2, help="trainings per LR, their accuracy averaged")
    parser.add_argument("--train-subset", type=int, default=0, help="training samples per case; 0: all 55k")
    parser.add_argument("--cache", type=Path, help="JSON file of measured accuracies, read and extended")
    parser.add_argument("--data-dir", type=Path, default=Path(data.SYSTEM_DIRS["fashion-mnist"]))
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    source = data.Source((args.data_dir,))
    start = time.perf_counter()
    chosen = [c for c in CASES if c.name in args.cases.split(",")]
    cache = Cache(args.cache)
    measured = {c.name: run_case(c, args.epochs, source, args.train_subset, cache, args.train_seeds) for c in chosen}
    results = {name: regrets for name, (regrets, _, _) in measured.items()}
    names = [*RULES, "lightning"]
    subset = args.train_subset or "all"
    print(f"\nregret in test-accuracy points ({args.epochs} epochs, constant LR, {subset} training samples, "
          f"mean of {args.train_seeds} training seeds)\n")  # fmt: skip
    print("| case | " + " | ".join(names) + " | noise of one training | s.e. of combined's regret |")
    print("|---" * (len(names) + 3) + "|")
    for case, (regrets, noise, errors) in measured.items():
        cells = [f"{regrets[n]:.2f}" if regrets[n] is not None else "none" for n in names]
        print(f"| {case} | " + " | ".join(cells) + f" | {noise:.2f} | {errors.get('combined', math.nan):.2f} |")
    means = [np.mean([r[n] for r in results.values() if r[n] is not None] or [np.nan]) for n in names]
    print("| mean | " + " | ".join(f"{m:.2f}" for m in means) + " | | |")
    if args.seeds > 1:
        spreads = spread(chosen[0], args.seeds, source, args.epochs)
        print(f"\nspread over {args.seeds} seeds ({chosen[0].name}), decades: " + ", ".join(
            f"{k}={v:.2f}" for k, v in spreads.items()))  # fmt: skip
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
