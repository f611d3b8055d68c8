"""What the job's fit costs over a plain `Trainer.fit` of the same user module and data, side by side.

    python -m benchmarks.overhead [--cases backbone,tabular,sequence] [--epochs 3] [--repeats 5]

For each case (the shape of Lightning's backbone example on Lightning's own MNIST data module, fed Fashion-MNIST:
benchmarks/backbone.py; the example projects under examples/): a plain fit (a Trainer as a user writes it: no
logger, no checkpoints, no progress bar) and the job's fit (trainer.fit_setup's Trainer with the job's callbacks:
each epoch's checkpoint, the epoch values handed to a sink, the finiteness checks, the read-back of the LR and the
batch), both from the same seeded module, on the same data, precision and device; the two take turns, first and
second alternating. Prints each repeat's CPU seconds (this process's: the loaders have no workers) and the median of
the per-repeat ratios (job / plain). The test pass is left out of both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import backbone
from mlproject.config import JobConfig
from mlproject.training import runtime, task, trainer
from mlproject.training.classpaths import add_code_path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CACHE = Path(__file__).resolve().parent / ".cache"
CASES = {
    "backbone": ("benchmarks.backbone.LitClassifier", backbone.DATA_MODULE, ""),
    "tabular": ("tabular.TabularRegressor", "tabular.SyntheticTabular", '{"samples": 20000}'),
    "sequence": ("sequence.GRUClassifier", "sequence.MajorityTokens", '{"samples": 12000}'),
}


def config(case: str, epochs: int) -> JobConfig:
    model, dataset, args = CASES[case]
    if case == "backbone":  # its data module's own loaders, with no workers: the CPU time is this process's
        folder = str(backbone.mnist_folder(CACHE / "mnist"))
        args = json.dumps({"data_dir": folder, "num_workers": 0, "batch_size": 32})
        return JobConfig(model=model, dataset=dataset, dataset_args=args, epochs=epochs)
    return JobConfig(model=model, dataset=dataset, dataset_args=args, code=str(EXAMPLES / case), epochs=epochs)


def plain_fit(job: task.Task, rt: runtime.Runtime, cfg: JobConfig) -> float:
    module = fresh(job, rt, cfg)
    plain = job.lightning.trainer(
        accelerator=rt.accelerator, devices=1, precision=rt.precision, max_epochs=cfg.epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    start = time.process_time()
    plain.fit(module, **job.data.loaders(cfg.seed, rt.device.type).fit_kwargs())
    return time.process_time() - start


def job_fit(job: task.Task, rt: runtime.Runtime, cfg: JobConfig, workdir: Path) -> float:
    module = fresh(job, rt, cfg)  # at its own LR, as the plain fit: lr_source=module
    keep = lambda path: path.read_bytes()  # noqa: E731 - the job hands the checkpoint to the tracker: at least read it
    loaders = job.data.loaders(cfg.seed, rt.device.type)
    setup = trainer.fit_setup(job.lightning, rt, loaders, cfg.epochs, lambda e, m: None, workdir / "c.ckpt", keep)
    start = time.process_time()
    setup.trainer.fit(module, **loaders.fit_kwargs())
    return time.process_time() - start


def fresh(job: task.Task, rt: runtime.Runtime, cfg: JobConfig) -> Any:
    return job.module(cfg.seed, rt.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="backbone,tabular,sequence")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| case | repeat | plain fit (CPU s) | job's fit (CPU s) | job / plain |\n|---|---|---|---|---|")
    for case in args.cases.split(","):
        cfg = config(case, args.epochs)
        add_code_path(cfg.code)
        job, rt = task.build(cfg), runtime.detect_runtime(cfg)
        ratios = []
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                first, second = (plain_fit, job_fit) if r % 2 == 0 else (job_fit, plain_fit)
                times = {f.__name__: f(job, rt, cfg, Path(tmp)) if f is job_fit else f(job, rt, cfg)
                         for f in (first, second)}  # fmt: skip
                ratios.append(times["job_fit"] / times["plain_fit"])
                print(f"| {case} | {r + 1} | {times['plain_fit']:.2f} | {times['job_fit']:.2f} | {ratios[-1]:.3f} |")
                sys.stdout.flush()
        print(f"| {case} | median of {args.repeats} | | | **{np.median(ratios):.3f}** |")


if __name__ == "__main__":
    main()
