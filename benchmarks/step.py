"""LeNet's training step in this job's Lightning fit, against the same fit with the NVML-based CUDA check left on
(as importing Lightning leaves it) and against a bare PyTorch loop over the same batches. Interleaved.

    python -m benchmarks.step [--data-dir /usr/share/datasets/fashion-mnist] [--blocks 16] [--steps 140]

Each block is `steps` timed steps (after 10 untimed) on the same training batches, with the job's network,
precision, memory format and optimizer; the variants take turns block by block, so a slow stretch of the
machine lands on all of them. Prints the fastest block, the first quartile and the median, in ms a step.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from mlproject import data, pipeline, training
from mlproject.config import JobConfig
from mlproject.model import OptimSpec, make_optimizer

WARMUP = 10  # untimed steps at the start of each block


class StepClock(pl.Callback):
    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.timed = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if batch_idx == WARMUP:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.end, self.timed = time.perf_counter(), batch_idx + 1 - WARMUP


class Fixed:
    """The same batches every block."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.batches)


def lightning_block(cfg: JobConfig, rt: training.Runtime, batches: Fixed, nvml: str) -> float:
    os.environ[training.NVML_CHECK] = nvml
    clock = StepClock()
    module = pipeline.build_classifier(cfg, rt, OptimSpec(cfg.optimizer, cfg.lr))
    training.build_trainer(rt, 1, [clock], limit_val_batches=0).fit(module, train_dataloaders=batches)
    return (clock.end - clock.start) / clock.timed * 1e3


def bare_block(cfg: JobConfig, rt: training.Runtime, batches: Fixed) -> float:
    """forward, backward and the optimizer step, nothing else (CPU autocast when the job uses bf16)."""
    module = pipeline.build_classifier(cfg, rt, OptimSpec(cfg.optimizer, cfg.lr))
    optimizer = make_optimizer(module.parameters(), cfg.optimizer, cfg.lr)
    bf16 = rt.precision == "bf16-mixed"
    for i, batch in enumerate(batches):
        if i == WARMUP:
            start = time.perf_counter()
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = module.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / (len(batches) - WARMUP) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--steps", type=int, default=140, help="timed steps a block")
    args = parser.parse_args()
    cfg = JobConfig(epochs=1)
    ds = pipeline.load_data(cfg, data.Source((args.data_dir,)))
    rt = training.detect_runtime(cfg, ds.train.images.numel())
    train, _, _ = pipeline.fit_batches(cfg, ds, rt)
    batches = Fixed(list(train)[: WARMUP + args.steps])
    job_nvml = os.environ.get(training.NVML_CHECK, "")  # what detect_runtime chose for this machine
    variants = {
        "this job (Lightning fit)": lambda: lightning_block(cfg, rt, batches, job_nvml),
        "the same, NVML check on": lambda: lightning_block(cfg, rt, batches, "1"),
        "bare PyTorch loop": lambda: bare_block(cfg, rt, batches),
    }
    ms: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.blocks):
        for name, block in variants.items():
            ms[name].append(block())
    print(f"\nms a training step ({rt.accelerator}, {rt.precision}; {args.blocks} blocks of {args.steps} steps)")
    print("| variant | fastest block | first quartile | median |\n|---|---|---|---|")
    for name, values in ms.items():
        low, q1, mid = np.percentile(values, [0, 25, 50])
        print(f"| {name} | {low:.2f} | {q1:.2f} | {mid:.2f} |")


if __name__ == "__main__":
    main()
