"""LeNet's training step in this job's Lightning fit, against the same fit with one of the job's savings undone and
against a bare PyTorch loop over the same batches. Interleaved.

The savings undone, one variant each: the NVML-based CUDA check left on (as importing Lightning leaves it; only on
a CPU, where it applies); LeNet's ReLUs before its pooling (the textbook order). The same fit with channels_last
flipped (on by default on a CPU, off on a GPU). And two loops without Lightning's Trainer: Lightning
Fabric's (its precision plugin and backward, the loop written out) and a bare PyTorch one. On a GPU the clock
waits for the device at both ends of a block.

    python -m benchmarks.step [--data-dir /usr/share/datasets/fashion-mnist] [--blocks 16] [--steps 140]

Each block is `steps` timed steps (after 10 untimed) on the same training batches, with the job's network,
precision, memory format and optimizer; the variants take turns block by block, in an order reversed every other
round, so a slow stretch of the machine lands on all of them. Prints the fastest block, the first quartile and the
median, in ms a step, and the median over blocks of each variant's time divided by the job's in the same round.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_fabric import Fabric
from torch import nn

from mlproject.config import JobConfig
from mlproject.training import networks, runtime, task, trainer
from mlproject.training.classifier import make_optimizer

WARMUP = 10  # untimed steps at the start of each block
Batch = tuple[torch.Tensor, torch.Tensor]
JOB = "this job (Lightning fit)"


def now(device: torch.device) -> float:
    """The time once the device has finished what it was given (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StepClock(pl.Callback):
    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.timed = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if batch_idx == WARMUP:
            self.start = now(pl_module.device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.end, self.timed = now(pl_module.device), batch_idx + 1 - WARMUP


class Fixed:
    """The same batches every block."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.batches)


def textbook_lenet(*args: int) -> nn.Module:
    net = networks.lenet(*args)
    return nn.Sequential(net[0], nn.ReLU(), nn.MaxPool2d(2), net[3], nn.ReLU(), net[4], *net[6:])


UNDONE: dict[str, Callable[[], list[contextlib.AbstractContextManager]]] = {
    JOB: lambda: [],
    "the same, NVML check on": lambda: [mock.patch.dict(os.environ, {trainer.NVML_CHECK: "1"})],
    "the same, ReLU before pooling (textbook order)": lambda: [
        mock.patch.dict(networks.NETS, {"lenet": textbook_lenet})
    ],
}
CPU_ONLY = {"the same, NVML check on"}


def lightning_block(job: task.Task, rt: runtime.Runtime, batches: Fixed, undone: str) -> float:
    clock = StepClock()
    with contextlib.ExitStack() as stack:
        fitter = trainer.build_trainer(job.lightning, rt, 1, [clock], limit_val_batches=0)
        for change in UNDONE[undone]():  # after build_trainer, which switches the NVML check off on a CPU
            stack.enter_context(change)
        fitter.fit(job.make_module(rt.channels_last), train_dataloaders=batches)
    return (clock.end - clock.start) / clock.timed * 1e3


def timed_loop(device: torch.device, batches: Fixed, step: Callable[[Batch], None]) -> float:
    """Run `step` on every batch; ms a step after the first WARMUP."""
    for i, batch in enumerate(batches):
        if i == WARMUP:
            start = now(device)
        step(batch)
    return (now(device) - start) / (len(batches) - WARMUP) * 1e3


def bare_block(cfg: JobConfig, job: task.Task, rt: runtime.Runtime, batches: Fixed) -> float:
    """forward, backward and the optimizer step, nothing else (CPU autocast when the job uses bf16)."""
    module = job.make_module(rt.channels_last).to(rt.device)
    optimizer = make_optimizer(module.parameters(), cfg.optimizer, cfg.lr)
    bf16 = rt.precision == "bf16-mixed"

    def step(batch: Batch) -> None:
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = module.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return timed_loop(rt.device, batches, step)


def fabric_block(cfg: JobConfig, job: task.Task, rt: runtime.Runtime, batches: Fixed) -> float:
    """The same step in a loop written against Lightning Fabric: its precision plugin (autocast) and backward,
    no Trainer, hooks or callbacks."""
    fabric = Fabric(accelerator=rt.accelerator, devices=1, precision=rt.precision)  # type: ignore[arg-type]
    module = job.make_module(rt.channels_last)
    net, optimizer = fabric.setup(module, make_optimizer(module.parameters(), cfg.optimizer, cfg.lr))

    def step(batch: Batch) -> None:
        x, y = batch
        loss = F.cross_entropy(net(x), y)  # the forward under Fabric's autocast; logits handed back in fp32
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()

    return timed_loop(rt.device, batches, step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--steps", type=int, default=140, help="timed steps a block")
    parser.add_argument("--only", default="", help="comma-separated words: time only the variants that name one")
    args = parser.parse_args()
    cfg = JobConfig(epochs=1, data_dir=str(args.data_dir))
    job, rt = task.build(cfg), runtime.detect_runtime(cfg)
    train = job.data.loaders(cfg.seed, rt.device.type).train
    batches = Fixed(list(itertools.islice(train, WARMUP + args.steps)))
    undone = [name for name in UNDONE if rt.accelerator == "cpu" or name not in CPU_ONLY]
    variants = {name: lambda name=name: lightning_block(job, rt, batches, name) for name in undone}
    flipped = dataclasses.replace(rt, channels_last=not rt.channels_last)
    variants[f"the same, channels_last {'on' if flipped.channels_last else 'off'}"] = lambda: lightning_block(
        job, flipped, batches, JOB
    )
    variants["Lightning Fabric loop"] = lambda: fabric_block(cfg, job, rt, batches)
    variants["bare PyTorch loop"] = lambda: bare_block(cfg, job, rt, batches)
    if args.only:
        words = [w.strip() for w in args.only.split(",") if w.strip()]
        variants = {n: v for n, v in variants.items() if n == JOB or any(w in n for w in words)}
    ms: dict[str, list[float]] = {name: [] for name in variants}
    for k in range(args.blocks):  # the order reversed every other round: no variant always runs first
        for name, block in list(variants.items())[:: 1 if k % 2 == 0 else -1]:
            ms[name].append(block())
    job = np.array(ms[JOB])
    print(f"\nms a training step ({rt.accelerator}, {rt.precision}; {args.blocks} blocks of {args.steps} steps)")
    print("| variant | fastest block | first quartile | median | / this job, same round |\n|---|---|---|---|---|")
    for name, values in ms.items():
        low, q1, mid = np.percentile(values, [0, 25, 50])
        print(f"| {name} | {low:.2f} | {q1:.2f} | {mid:.2f} | {np.median(np.array(values) / job):.3f} |")


if __name__ == "__main__":
    main()
