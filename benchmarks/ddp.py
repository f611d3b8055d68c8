"""Several processes against one, side by side: the range test's and an epoch's wall time of the same job with
devices=N (Lightning's DDP under torchrun; gloo on CPUs) and with devices=1 at N times the batch (the same global
batch, so the same samples per step).

    python -m benchmarks.ddp [--devices 2] [--repeats 3] [--train-subset 20000] [--epochs 2]

Each repeat runs both, the order alternating; the figures are the job's own (lr_find_seconds, epoch_seconds from
the MLflow run). Prints each repeat and the median of the per-repeat ratios (N processes / one).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient


def run_job(folder: Path, devices: int, batch: int, args: argparse.Namespace, name: str) -> dict[str, float]:
    uri = f"sqlite:///{folder}/mlflow.db"
    cmd = [sys.executable, "-m", "mlproject", "train", "--experiment-name", name, "--devices", str(devices)]
    cmd += ["--batch-size", str(batch), "--accelerator", args.accelerator, "--auto-lr", "true", "--epochs"]
    cmd += [str(args.epochs), "--train-subset", str(args.train_subset), "--val-size", "2000", "--progress", "off"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "LR_FINDER_LOG_LEVEL": "WARNING"}
    subprocess.run(cmd, cwd=folder, env=env, check=True)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    epochs = [m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")]
    return {"range_test": run.data.metrics["lr_find_seconds"], "epoch": float(np.median(epochs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per device")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    n, b = args.devices, args.batch_size
    print(f"| repeat | range test 1x{n * b} (s) | range test {n}x{b} (s) | epoch 1x{n * b} (s) | epoch {n}x{b} (s) |")
    print("|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {"range_test": [], "epoch": []}
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            order = [(1, n * b), (n, b)] if r % 2 == 0 else [(n, b), (1, n * b)]
            found = {d: run_job(Path(tmp), d, batch, args, f"d{d}") for d, batch in order}
        for key in ratios:
            ratios[key].append(found[n][key] / found[1][key])
        one, many = found[1], found[n]
        cells = [one["range_test"], many["range_test"], one["epoch"], many["epoch"]]
        print(f"| {r + 1} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
        sys.stdout.flush()
    print(f"\nmedian ratio, {n} processes / one: range test {np.median(ratios['range_test']):.2f}, "
          f"epoch {np.median(ratios['epoch']):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
