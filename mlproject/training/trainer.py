"""The Trainer for the resolved hardware, and the fit: fit, then test, each epoch's values handed to a sink."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlproject.processes import ranks
from mlproject.training import callbacks, lightning_api
from mlproject.training.lightning_api import Lightning
from mlproject.training.runtime import Runtime
from mlproject.training.sources import Loaders

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"  # torch's switch for an NVML-based torch.cuda.is_available()


def _strategy(lightning: Lightning, rt: Runtime) -> Any:
    """DDP across more than one process (gloo on CPUs), with a bounded wait for a lost rank; else Lightning's."""
    if rt.world_size == 1:
        return "auto"
    strategies = importlib.import_module(f"{lightning.name}.strategies")
    backend = "nccl" if rt.accelerator == "gpu" else "gloo"
    return strategies.DDPStrategy(process_group_backend=backend, timeout=ranks.TIMEOUT)


def _sharing(lightning: Lightning, rt: Runtime) -> list[Any]:
    return [lightning.make(callbacks.SharingHooks, "Callback", rt.sharing.tick)] if rt.sharing is not None else []


def build_trainer(
    lightning: Lightning,
    rt: Runtime,
    max_epochs: int,
    callbacks: list[Any],
    trainer_args: dict[str, Any] | None = None,
    **overrides: object,
) -> Any:
    """A Trainer with Lightning's own logger and checkpoints off: the record package owns the run and its keys.
    `trainer_args` (the job's clipping, accumulation, trainer_args) come over the job's settings, `overrides` (what
    this Trainer is for: a sweep, a trial) over both."""
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
        callbacks=[*callbacks, *_sharing(lightning, rt)],
    )
    kwargs.update(trainer_args or {})
    kwargs.update(overrides)
    return trainer_class(**kwargs)


@dataclass(frozen=True)
class FitResult:
    lr: float  # the LR the optimizers were built at (the one-cycle peak), read back from them
    batch_size: int | None  # the batch the training loader served (per device), None where it does not say
    optimizer: str  # the class of the optimizer that stepped, read back from the Trainer
    history: list[dict[str, float]]  # every epoch's reported values
    validation: dict[str, float]  # the last validation's values
    test: dict[str, float]  # empty when there is nothing to test on


@dataclass(frozen=True)
class FitSetup:
    """A fit's Trainer with the job's callbacks, and the two whose findings the job reads afterwards."""

    trainer: Any
    reporter: callbacks.ReporterHooks
    applied: callbacks.AppliedHooks


def fit_setup(
    lightning: Lightning,
    rt: Runtime,
    loaders: Loaders,
    epochs: int,
    sink: callbacks.EpochSink,
    checkpoint: Path,
    keep: Callable[[Path], None],
    built: Callable[[float], None] = lambda lr: None,
    check_stop: Callable[[], None] = lambda: None,
    extra: list[Any] | None = None,
    trainer_args: dict[str, Any] | None = None,
    bar: bool = False,
) -> FitSetup:
    """The fit's Trainer: the job's reporter (the epoch's values and checkpoint), guard and read-back of what was
    applied, then the callbacks the user added (benchmarks.overhead builds the same one)."""
    reporter = lightning.make(callbacks.ReporterHooks, "callbacks.Checkpoint", sink, checkpoint, keep)
    guard = lightning.make(callbacks.GuardHooks, "Callback", loaders.iterables(), check_stop)
    applied = lightning.make(callbacks.AppliedHooks, "Callback", built)
    averaged = lightning.make(callbacks.AveragedWeightsHooks, "Callback")
    hooks = [reporter, guard, applied, averaged, *(extra or [])]
    # enable_checkpointing: the reporter is the checkpoint callback
    fitter = build_trainer(
        lightning, rt, epochs, hooks, trainer_args, enable_checkpointing=True, enable_progress_bar=bar
    )
    return FitSetup(fitter, reporter, applied)


def fit_and_test(
    lightning: Lightning,
    module: Any,
    loaders: Loaders,
    rt: Runtime,
    *,
    epochs: int,
    sink: callbacks.EpochSink,
    checkpoint: Path,
    keep: Callable[[Path], None],
    built: Callable[[float], None] = lambda lr: None,
    resume_from: Path | None = None,
    bar: bool = False,
    extra: list[Any] | None = None,
    trainer_args: dict[str, Any] | None = None,
) -> FitResult:
    """Fit (from `resume_from` when given), then test; `checkpoint` holds the last good epoch's state, `built` gets
    the LR the optimizers were built at before the first step."""
    with ranks.stop_together(rt.world_size) as check_stop:
        setup = fit_setup(
            lightning, rt, loaders, epochs, sink, checkpoint, keep, built, check_stop, extra, trainer_args, bar
        )
        setup.trainer.fit(module, **loaders.fit_kwargs(), ckpt_path=resume_from)
        test_inputs = loaders.test_kwargs()  # None: no test data; a module without test_step: no test either
        tested = test_inputs is not None and lightning_api.defines(type(module), "test_step")
        results = setup.trainer.test(module, **(test_inputs or {}), verbose=False) if tested else [{}]
    test = {k: float(v) for k, v in (results[0] if results else {}).items()}
    reporter, applied = setup.reporter, setup.applied
    return FitResult(applied.lr, applied.batch_size, applied.optimizer, reporter.history, reporter.validation, test)
