"""Build the Trainer and the batches for the resolved hardware, fit, test; report epoch metrics to a sink."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from mlproject import data, stopping
from mlproject.config import JobConfig
from mlproject.errors import HardwareError, TrainingDiverged

log = logging.getLogger(__name__)

EpochSink = Callable[[int, dict[str, float]], None]
EPOCH_METRICS = ("train_loss", "val_loss", "val_acc", "learning_rate")
# The device path holds a split as uint8 on the device; past this size a DataLoader streams it instead.
DEVICE_DATA_LIMIT_BYTES = 4 * 2**30
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"  # torch's switch for an NVML-based torch.cuda.is_available()


@dataclass(frozen=True)
class Runtime:
    """The hardware decisions, made once from the config and what this machine has."""

    accelerator: str  # cpu or gpu
    devices: int
    precision: str
    data_mode: str  # device or loader
    channels_last: bool

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.accelerator == "gpu" else "cpu")


def resolve_runtime(
    cfg: JobConfig, cuda_available: bool, gpu_bf16: bool, data_bytes: int, cpu_bf16: bool = False
) -> Runtime:
    """Pure: what to run on. 'auto' picks the GPU when there is one, and bf16-mixed where the chosen device
    computes bf16 natively (a bf16 GPU; a CPU with AVX512-BF16 or AMX)."""
    if cfg.accelerator == "gpu" and not cuda_available:
        raise HardwareError("accelerator=gpu but no CUDA device is visible; use accelerator=cpu or auto")
    accelerator = "gpu" if cfg.accelerator == "gpu" or (cfg.accelerator == "auto" and cuda_available) else "cpu"
    if accelerator == "cpu" and cfg.devices > 1:
        raise HardwareError(f"devices={cfg.devices} needs GPUs; on the CPU use devices=1")
    precision = cfg.precision
    if accelerator == "cpu" and precision == "16-mixed":  # Lightning would train in bf16 instead, unasked
        raise HardwareError("precision=16-mixed needs a GPU and none is visible; use auto, bf16-mixed or 32-true")
    if precision == "auto":
        native = gpu_bf16 if accelerator == "gpu" else cpu_bf16
        # bf16-mixed on a CPU with native bf16: fp32 is slower for LeNet's step (benchmarks/RESULTS.md).
        precision = "bf16-mixed" if native else "32-true"
    data_mode = cfg.data_mode
    if data_mode == "auto":
        data_mode = "device" if cfg.devices == 1 and data_bytes <= DEVICE_DATA_LIMIT_BYTES else "loader"
    # channels_last: convolutions on a CPU are markedly faster in it (benchmarks/RESULTS.md).
    channels_last = accelerator == "cpu" and cfg.model != "mlp"
    return Runtime(accelerator, cfg.devices, precision, data_mode, channels_last)


def detect_runtime(cfg: JobConfig, data_bytes: int) -> Runtime:
    cuda = torch.cuda.is_available()
    cpu_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    rt = resolve_runtime(cfg, cuda, cuda and torch.cuda.is_bf16_supported(), data_bytes, cpu_bf16)
    if rt.accelerator == "gpu":  # TF32 for what stays in fp32: Ampere and newer run it at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        # Importing Lightning sets NVML_CHECK=1 (so that asking for CUDA does not initialise it before DataLoader
        # workers fork). Every optimizer step asks, and without a GPU the check tries to load libnvidia-ml each
        # time, a measurable share of LeNet's step. A CPU run has no CUDA to protect.
        os.environ[NVML_CHECK] = "0"
    return rt


def batches(
    split: data.Split, ds: data.Dataset, rt: Runtime, batch_size: int, shuffle: bool, seed: int
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if rt.data_mode == "device":
        return data.DeviceBatches(split.to(rt.device), batch_size, ds.mean, ds.std, shuffle, seed)
    return data.loader_batches(split, batch_size, ds.mean, ds.std, shuffle, seed)


def build_trainer(rt: Runtime, max_epochs: int, callbacks: list[pl.Callback], **overrides: object) -> pl.Trainer:
    """A Trainer with Lightning's own logger and checkpoints off: tracking.py owns the run and its keys."""
    kwargs: dict[str, object] = dict(
        accelerator=rt.accelerator,
        devices=rt.devices,
        precision=rt.precision,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)  # type: ignore[arg-type]


class EpochReporter(pl.Callback):
    """At the end of every epoch, writes `last.ckpt` if the epoch's loss was finite (the last good state), then
    hands the epoch's aggregates to a sink: one host sync per epoch, not per step.

    The two happen under stopping.held(): a SIGTERM between them would leave a run that shows an epoch it has
    no checkpoint of, or a checkpoint of an epoch it never showed (which a resume would then skip).
    """

    def __init__(self, sink: EpochSink, checkpoint: Path) -> None:
        self.sink = sink
        self.checkpoint = checkpoint
        self.history: list[dict[str, float]] = []
        self.started = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        found = trainer.callback_metrics
        metrics = {k: float(found[k]) for k in EPOCH_METRICS if k in found}
        metrics["epoch_seconds"] = time.perf_counter() - self.started  # training and validation
        self.history.append(metrics)
        with stopping.held():
            if math.isfinite(metrics.get("train_loss", 0.0)):
                trainer.save_checkpoint(self.checkpoint)
            self.sink(trainer.current_epoch, metrics)


class EpochGuard(pl.Callback):
    """Keeps training honest and resumable: pins the shuffle to the epoch, and stops on a non-finite loss
    (after the reporter has shown that epoch; its checkpoint is the epoch before)."""

    CHECK_EVERY = 25  # batches between finiteness checks: each check is one host sync

    def __init__(self, train: object) -> None:
        self.train = train

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.train, data.DeviceBatches):
            self.train.set_epoch(trainer.current_epoch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % self.CHECK_EVERY == 0:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self._check(float(loss), trainer, f"step {trainer.global_step}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None:
            self._check(float(loss), trainer, "the epoch's mean")

    def _check(self, loss: float, trainer: pl.Trainer, where: str) -> None:
        if not math.isfinite(loss):
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            raise TrainingDiverged(
                f"training loss is {loss} at epoch {trainer.current_epoch} ({where}, lr {lr:.3g}): "
                "the learning rate is too high for this model; lower lr, or use auto_lr=true"
            )


@dataclass(frozen=True)
class FitResult:
    history: list[dict[str, float]]
    test: dict[str, float]


def fit_and_test(
    module: pl.LightningModule,
    train: Iterable[tuple[torch.Tensor, torch.Tensor]],
    val: Iterable[tuple[torch.Tensor, torch.Tensor]],
    test: Iterable[tuple[torch.Tensor, torch.Tensor]],
    rt: Runtime,
    epochs: int,
    sink: EpochSink,
    checkpoint: Path,
    resume_from: Path | None = None,
) -> FitResult:
    """Fit (from `resume_from` when given), then test; `checkpoint` holds the last good epoch's state."""
    reporter = EpochReporter(sink, checkpoint)
    trainer = build_trainer(rt, epochs, [reporter, EpochGuard(train)])
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val, ckpt_path=resume_from)
    results = trainer.test(module, dataloaders=test, verbose=False)
    return FitResult(reporter.history, {k: float(v) for k, v in results[0].items()})
