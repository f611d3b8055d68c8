"""Build the Trainer for the resolved hardware, set the fit's LR and schedule on any module, fit, test; report each
epoch's values to a sink."""

from __future__ import annotations

import importlib
import logging
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlproject import callbacks, ranks
from mlproject.config import ConfigError, JobConfig
from mlproject.errors import HardwareError, UserCodeError
from mlproject.lightning_api import Lightning

log = logging.getLogger(__name__)

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"  # torch's switch for an NVML-based torch.cuda.is_available()


@dataclass(frozen=True)
class Runtime:
    """The hardware decisions, made once from the config and what this machine has."""

    accelerator: str  # cpu or gpu
    devices: int
    precision: str
    channels_last: bool
    num_nodes: int = 1

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.accelerator == "gpu" else "cpu")

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def resolve_runtime(cfg: JobConfig, cuda_available: bool, gpu_bf16: bool, cpu_bf16: bool = False) -> Runtime:
    """Pure: what to run on. 'auto' picks the GPU when there is one, and bf16-mixed where the chosen device
    computes bf16 natively (a bf16 GPU; a CPU with AVX512-BF16 or AMX)."""
    if cfg.accelerator == "gpu" and not cuda_available:
        raise HardwareError("accelerator=gpu but no CUDA device is visible; use accelerator=cpu or auto")
    accelerator = "gpu" if cfg.accelerator == "gpu" or (cfg.accelerator == "auto" and cuda_available) else "cpu"
    precision = cfg.precision
    if accelerator == "cpu" and precision == "16-mixed":  # Lightning would train in bf16 instead, unasked
        raise HardwareError("precision=16-mixed needs a GPU and none is visible; use auto, bf16-mixed or 32-true")
    if precision == "auto":
        # bf16-mixed where the device computes it natively: fp32 is slower for LeNet's step (benchmarks/RESULTS.md).
        precision = "bf16-mixed" if (gpu_bf16 if accelerator == "gpu" else cpu_bf16) else "32-true"
    # channels_last: convolutions on a CPU are markedly faster in it (benchmarks/RESULTS.md); an MLP has none.
    channels_last = accelerator == "cpu" and cfg.model != "mlp"
    return Runtime(accelerator, cfg.devices, precision, channels_last, cfg.num_nodes)


def detect_runtime(cfg: JobConfig) -> Runtime:
    cuda = torch.cuda.is_available()
    cpu_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    rt = resolve_runtime(cfg, cuda, cuda and torch.cuda.is_bf16_supported(), cpu_bf16)
    if rt.accelerator == "gpu":  # TF32 for what stays in fp32: Ampere and newer run it at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rt


def _strategy(lightning: Lightning, rt: Runtime) -> Any:
    """DDP across more than one process (gloo on CPUs), with a bounded wait for a lost rank; else Lightning's."""
    if rt.world_size == 1:
        return "auto"
    strategies = importlib.import_module(f"{lightning.name}.strategies")
    backend = "nccl" if rt.accelerator == "gpu" else "gloo"
    return strategies.DDPStrategy(process_group_backend=backend, timeout=ranks.TIMEOUT)


def build_trainer(lightning: Lightning, rt: Runtime, max_epochs: int, callbacks: list[Any], **overrides: object) -> Any:
    """A Trainer with Lightning's own logger and checkpoints off: tracking.py owns the run and its keys."""
    trainer_class = lightning.pl.Trainer  # imports the package, which sets NVML_CHECK=1: set it after that
    if rt.accelerator == "cpu":
        # Lightning sets NVML_CHECK=1 so that asking for CUDA does not initialise it before DataLoader workers fork.
        # Every optimizer step asks, and without a GPU the check tries to load libnvidia-ml each time, a
        # measurable share of LeNet's step. A CPU run has no CUDA to protect.
        os.environ[NVML_CHECK] = "0"
    kwargs: dict[str, object] = dict(
        accelerator=rt.accelerator,
        devices=rt.devices,
        num_nodes=rt.num_nodes,
        strategy=_strategy(lightning, rt),
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
    return trainer_class(**kwargs)


# --- the fit's LR and schedule, on any module ----------------------------------------------------------------


def set_lr(lightning: Lightning, module: Any, attr: str, lr: float) -> None:
    """The LR the module's configure_optimizers builds its optimizer at (an attribute, or in its hparams)."""
    lightning.parsing().lightning_setattr(module, attr, lr)


def apply_schedule(module: Any, schedule: str, peak: float, low: float) -> None:
    """module: its own configure_optimizers as it is. constant: its optimizers, their schedulers dropped.
    onecycle: its one optimizer under a one-cycle schedule from `low` (0: peak / 25) to `peak` over the fit."""
    if schedule == "module":
        return
    original = module.configure_optimizers
    owner = type(module).__qualname__

    def configure_optimizers(self: Any) -> Any:
        optimizers = _optimizers(original(), owner)
        if schedule == "constant":
            return optimizers
        if len(optimizers) != 1:
            raise ConfigError(
                "schedule", schedule, f"module or constant for {owner}, which has {len(optimizers)} optimizers"
            )
        div = peak / low if low > 0 else 25.0
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.OneCycleLR(optimizers[0], max_lr=peak, total_steps=total, div_factor=div)
        return {"optimizer": optimizers[0], "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    object.__setattr__(module, "configure_optimizers", types.MethodType(configure_optimizers, module))


def _optimizers(configured: Any, owner: str) -> list[torch.optim.Optimizer]:
    """The optimizers in any of the shapes configure_optimizers may return (Lightning's documented ones)."""
    if isinstance(configured, torch.optim.Optimizer):
        return [configured]
    if isinstance(configured, dict):
        return [configured["optimizer"]]
    if isinstance(configured, (list, tuple)):
        if len(configured) == 2 and isinstance(configured[0], (list, tuple)):  # ([optimizers], [schedulers])
            return list(configured[0])
        return [o if isinstance(o, torch.optim.Optimizer) else o["optimizer"] for o in configured]
    raise UserCodeError(f"{owner}.configure_optimizers returned {type(configured).__name__}, not an optimizer")


@dataclass(frozen=True)
class FitResult:
    history: list[dict[str, float]]  # every epoch's reported values
    validation: dict[str, float]  # the last validation's values
    test: dict[str, float]  # empty when there is nothing to test on


def fit_and_test(
    lightning: Lightning,
    module: Any,
    loaders: Any,
    rt: Runtime,
    *,
    epochs: int,
    sink: callbacks.EpochSink,
    checkpoint: Path,
    keep: Callable[[Path], None],
    resume_from: Path | None = None,
    bar: bool = False,
) -> FitResult:
    """Fit (from `resume_from` when given), then test; `checkpoint` holds the last good epoch's state."""
    with ranks.stop_together(rt.world_size) as check_stop:
        reporter = lightning.make(callbacks.ReporterHooks, "callbacks.Checkpoint", sink, checkpoint, keep)
        guard = lightning.make(callbacks.GuardHooks, "Callback", loaders.iterables(), check_stop)
        trainer = build_trainer(
            lightning, rt, epochs, [reporter, guard], enable_checkpointing=True, enable_progress_bar=bar
        )  # enable_checkpointing: the reporter is the checkpoint callback
        trainer.fit(module, **loaders.fit_kwargs(), ckpt_path=resume_from)
        test_inputs = loaders.test_kwargs()
        results = trainer.test(module, **test_inputs, verbose=False) if test_inputs else [{}]
    test = {k: float(v) for k, v in (results[0] if results else {}).items()}
    return FitResult(reporter.history, reporter.validation, test)
