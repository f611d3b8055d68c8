"""The job where it is not alone on the machine, side by side in one invocation: epochs and wall times of the same
job alone, two at once, beside a busy process, as a study's parallel members, as DDP ranks, and in a container
given --cpus 1. Each sharing setting runs twice: with the job's thread rule (processes/threads.py), and with
OMP_NUM_THREADS set to every CPU of the machine, torch's own default and what the job did before the rule.

    python -m benchmarks.contention [--train-subset 30000] [--epochs 3] [--study-epochs 8] [--image lr-finder:test]
                                    [--repeats 1]

Every job is `python -m mlproject train` (or `compare`) at a fixed lr, LeNet on Fashion-MNIST, its own sqlite store;
an epoch's figure is the median of the run's own `epoch_seconds`, a job's wall time from process start to exit. A
study's two members train --study-epochs each: a member in a process of its own pays for its imports once.
The container arm runs the job image's Python on this checkout, mounted read-only (the image need not be rebuilt);
it is skipped when the image is absent. Prints one table per repeat and the ratios the thread rule is held to.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from mlproject.catalog import FASHION_MNIST_DIR

REPO = Path(__file__).resolve().parents[1]
BEFORE = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}  # torch's default: one thread per CPU of the machine
RULE: dict[str, str] = {}


class Jobs:
    def __init__(self, folder: Path, args: argparse.Namespace) -> None:
        self.folder, self.args, self.count = folder, args, 0

    def command(self, *extra: str, subcommand: str = "train") -> tuple[list[str], str, Path]:
        self.count += 1
        name, here = f"job-{self.count}", self.folder / f"job-{self.count}"
        here.mkdir()
        cmd = ["-m", "mlproject", subcommand, "--experiment-name", name, "--progress", "off", "--lr", "0.003"]
        cmd += ["--epochs", str(self.args.epochs), "--train-subset", str(self.args.train_subset), "--val-size", "2000"]
        return [*cmd, *extra], name, here

    def start(self, env: dict[str, str], *extra: str, subcommand: str = "train") -> tuple[subprocess.Popen, str, Path]:
        cmd, name, here = self.command(*extra, subcommand=subcommand)
        full = {**os.environ, **env, "MLFLOW_TRACKING_URI": f"sqlite:///{here}/mlflow.db"}
        full |= {"LR_FINDER_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, *cmd], cwd=here, env=full, stdout=subprocess.DEVNULL)
        return proc, name, here

    def run(self, env: dict[str, str], *extra: str, subcommand: str = "train") -> dict[str, float]:
        return self.together([(env, extra)], subcommand)[0]

    def together(self, jobs: list[tuple[dict[str, str], tuple[str, ...]]], subcommand: str = "train") -> list[dict]:
        began = time.perf_counter()
        started = [self.start(env, *extra, subcommand=subcommand) for env, extra in jobs]
        walls = []
        for proc, _, _ in started:
            if proc.wait() != 0:
                raise SystemExit(f"a job failed ({proc.returncode}); its folder: {self.folder}")
            walls.append(time.perf_counter() - began)
        return [{**read(here, name), "wall": wall} for (_, name, here), wall in zip(started, walls, strict=True)]


def read(here: Path, name: str) -> dict[str, float]:
    """The median epoch of every run in the experiment (a study's members), and the threads its last epoch had."""
    client = MlflowClient(f"sqlite:///{here}/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    epochs, threads = [], []
    for run in client.search_runs([experiment.experiment_id]):
        epochs += [m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")]
        threads += [m.value for m in client.get_metric_history(run.info.run_id, "threads")]
    return {"epoch": float(np.median(epochs)) if epochs else float("nan"), "threads": min(threads, default=0)}


@contextmanager
def busy_process() -> Iterator[None]:
    """One process that keeps a CPU busy, as another tenant's job does."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def in_container(image: str, folder: Path, args: argparse.Namespace) -> dict[str, float] | None:
    """The job in the image, given --cpus 1, against this checkout mounted read-only; None without docker or image."""
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode
    ):
        return None
    here = folder / "container"
    here.mkdir(mode=0o777)
    here.chmod(0o777)  # the image's user writes the store
    cmd = ["docker", "run", "--rm", "--cpus", "1", "--network", "none", "--entrypoint", "python"]
    cmd += ["-v", f"{REPO}:/src:ro", "-v", f"{here}:/work", "-v", f"{FASHION_MNIST_DIR}:{FASHION_MNIST_DIR}:ro"]
    cmd += ["-w", "/work", "-e", "PYTHONPATH=/src", "-e", "MLFLOW_TRACKING_URI=sqlite:////work/mlflow.db"]
    cmd += ["-e", "LR_FINDER_LOG_LEVEL=WARNING", image, "-m", "mlproject", "train", "--experiment-name", "container"]
    cmd += ["--progress", "off", "--lr", "0.003", "--epochs", str(args.epochs), "--train-subset"]
    cmd += [str(args.train_subset), "--val-size", "2000"]
    began = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return {**read(here, "container"), "wall": time.perf_counter() - began}


def one_repeat(jobs: Jobs, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    first, second = jobs.run(RULE), jobs.run(RULE)
    rows["alone"] = first
    rows["alone, twice one after the other"] = {"epoch": second["epoch"], "wall": first["wall"] + second["wall"]}
    rows["alone, 1 thread"] = jobs.run({"OMP_NUM_THREADS": "1"})
    for label, env in (("rule", RULE), ("before", BEFORE)):
        a, b = jobs.together([(env, ()), (env, ())])
        slower = max(a, b, key=lambda row: row["epoch"])
        rows[f"two at once, {label}"] = {**slower, "wall": max(a["wall"], b["wall"])}
    for label, env in (("rule", RULE), ("before", BEFORE)):
        with busy_process():
            rows[f"beside a busy process, {label}"] = jobs.run(env)
    study = ("--lrs", "0.001,0.003", "--auto-lr", "false", "--epochs", str(args.study_epochs))
    rows["study, parallel=1"] = jobs.run(RULE, *study, "--parallel", "1", subcommand="compare")
    for label, env in (("rule", RULE), ("before", BEFORE)):
        rows[f"study, parallel=2, {label}"] = jobs.run(env, *study, "--parallel", "2", subcommand="compare")
    rows["DDP, 1 process x 64"] = jobs.run(RULE, "--devices", "1", "--batch-size", "64")
    rows["DDP, 2 processes x 32"] = jobs.run(RULE, "--devices", "2", "--batch-size", "32")
    container = in_container(args.image, jobs.folder, args)
    if container is not None:
        rows["container --cpus 1"] = container
    return rows


# (what, the row measured, the row it is measured against, which figure, the target)
RATIOS = [
    ("two at once: epoch / alone", "two at once, rule", "alone", "epoch", "<= 2.2"),
    ("two at once, before the rule", "two at once, before", "alone", "epoch", ""),
    (
        "two at once: wall / one after the other",
        "two at once, rule",
        "alone, twice one after the other",
        "wall",
        "<= 1.1",
    ),
    ("two at once, before the rule: wall", "two at once, before", "alone, twice one after the other", "wall", ""),
    ("beside a busy process: epoch / alone", "beside a busy process, rule", "alone", "epoch", "<= 2.2"),
    ("beside a busy process, before the rule", "beside a busy process, before", "alone", "epoch", ""),
    ("study: parallel=2 wall / parallel=1", "study, parallel=2, rule", "study, parallel=1", "wall", "<= 1.1"),
    ("study, before the rule", "study, parallel=2, before", "study, parallel=1", "wall", ""),
    ("DDP: 2 processes / 1, epoch", "DDP, 2 processes x 32", "DDP, 1 process x 64", "epoch", "<= 1.2"),
    ("container --cpus 1 / 1 thread outside, epoch", "container --cpus 1", "alone, 1 thread", "epoch", "<= 1.1"),
]


def ratios(rows: dict[str, dict[str, float]]) -> list[tuple[str, float, str]]:
    """(what, ratio, target) for each target whose rows ran."""
    found = []
    for what, measured, against, figure, target in RATIOS:
        if measured in rows and against in rows:
            found.append((what, rows[measured][figure] / rows[against][figure], target))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-subset", type=int, default=30000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--study-epochs", type=int, default=8, help="each study member's: it starts a process")
    parser.add_argument("--image", default="lr-finder:test", help="the job image for the container arm")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; {args.train_subset} images, {args.epochs} epochs a job; 'before': {BEFORE}")
    all_ratios: dict[str, list[float]] = {}
    bounds: dict[str, str] = {}
    for repeat in range(1, args.repeats + 1):
        with tempfile.TemporaryDirectory(prefix="contention-") as tmp:
            rows = one_repeat(Jobs(Path(tmp), args), args)
        print(f"\nrepeat {repeat}\n\n| setting | epoch (s) | wall (s) | threads at the end |\n|---|---|---|---|")
        for label, row in rows.items():
            threads = f"{row['threads']:.0f}" if row.get("threads") else ""
            print(f"| {label} | {row['epoch']:.2f} | {row['wall']:.1f} | {threads} |")
        for what, value, bound in ratios(rows):
            all_ratios.setdefault(what, []).append(value)
            bounds[what] = bound
    print("\n| ratio | median over repeats | target |\n|---|---|---|")
    for what, values in all_ratios.items():
        print(f"| {what} | {np.median(values):.2f} | {bounds[what]} |")


if __name__ == "__main__":
    main()
