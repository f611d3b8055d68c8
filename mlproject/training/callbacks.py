"""The job's Lightning callbacks, written once for both Lightning packages (lightning_api binds them): the epoch's
report and checkpoint, and the guard that keeps a fit honest, resumable and stoppable on every rank at once."""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlproject.errors import TrainingDiverged, UserCodeError
from mlproject.processes import ranks, stopping
from mlproject.training import batches, optimizers

EpochSink = Callable[[int, dict[str, float]], None]


def epoch_values(trainer: Any) -> dict[str, float]:
    """What the active loop's self.log calls produced at epoch level (step-level values left out), by the names
    Lightning's own loggers use; logger=False values too are left out."""
    results = trainer._results  # Lightning's per-loop result collection: the one source of on_epoch vs on_step
    if results is None:
        return {}
    return {k: float(v) for k, v in results.metrics(on_step=False)["log"].items() if torch.is_tensor(v)}


class ReporterHooks:
    """At the end of every epoch (after validation and the module's own epoch-end hooks, as a Checkpoint
    callback runs), writes `last.ckpt` if the epoch's training values are finite (the last good state) and hands it
    to `keep` (the run's artifact: a job killed outright is resumable from it), then hands every epoch-level value
    to a sink: one host sync per epoch, not per step.

    All of it happens under stopping.held(): a SIGTERM in between would leave a run that shows an epoch it has
    no checkpoint of, or a checkpoint of an epoch it never showed (which a resume would then skip).

    A value the module logs per step only (on_step=True, on_epoch=False) is reported as its epoch mean under its own
    name, summed on the device as it comes; `learning_rate` is the optimizers' LR as the epoch starts, the largest
    of their param groups, as lr_used reads it; `effective_lr`, for an optimizer that estimates its own step size
    (a param group with a `d`: Prodigy's), the epoch's mean of d x lr.
    """

    def __init__(self, sink: EpochSink, checkpoint: Path, keep: Callable[[Path], None]) -> None:
        self.sink = sink
        self.checkpoint = checkpoint
        self.keep = keep
        self.history: list[dict[str, float]] = []
        self.validation: dict[str, float] = {}
        self.started = 0.0
        self.lr = math.nan
        self.per_step: dict[str, tuple[torch.Tensor, int]] = {}
        self.last: dict[str, torch.Tensor] = {}  # each per-step value's latest tensor: one logged value counts once
        self.adapting: list[dict[str, Any]] = []  # param groups with a step-size estimate d (Prodigy's)
        self.adapted: list[float] = []  # d x lr after each of the epoch's steps

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.started = time.perf_counter()
        self.lr = max(float(group["lr"]) for opt in trainer.optimizers for group in opt.param_groups)
        self.validation, self.per_step, self.adapted = {}, {}, []
        self.adapting = [g for opt in trainer.optimizers for g in opt.param_groups if "d" in g]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.adapting:
            self.adapted.append(max(float(g["d"]) * float(g["lr"]) for g in self.adapting))
        results = trainer._results
        if results is None:
            return
        for _, metric in results.valid_items():
            meta, value = metric.meta, metric._forward_cache
            step_only = meta.on_step and not meta.on_epoch and meta.logger
            if step_only and isinstance(value, torch.Tensor) and self.last.get(meta.name) is not value:
                self.last[meta.name] = value
                total, count = self.per_step.get(meta.name, (torch.zeros((), device=value.device), 0))
                self.per_step[meta.name] = (total + value.detach().float(), count + 1)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.validation = epoch_values(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        train = epoch_values(trainer)
        steps = {name: float(total) / count for name, (total, count) in self.per_step.items()}
        metrics = {**steps, **train, **self.validation, "learning_rate": self.lr}
        metrics["epoch_seconds"] = time.perf_counter() - self.started  # training and validation
        metrics["threads"] = float(torch.get_num_threads())  # as the epoch ends: processes.threads may narrow them
        if self.adapted:  # an optimizer that sets its own step size (Prodigy: its estimate d times the scheduled lr)
            metrics["effective_lr"] = sum(self.adapted) / len(self.adapted)
        self.history.append(metrics)
        with stopping.held():
            if all(math.isfinite(v) for v in train.values()):
                trainer.save_checkpoint(self.checkpoint)
                if self.checkpoint.exists():  # rank 0 writes it
                    self.keep(self.checkpoint)
            self.sink(trainer.current_epoch, metrics)


class AppliedHooks:
    """What the fit applies, read back from what applies it: at the fit's start, once configure_optimizers has built
    the optimizers and before any step (and before a resumed fit restores their state), the LR they were built at,
    handed to `built`, which may stop the fit, and the class of the optimizer; as training starts, the batch size its
    loader serves (None where the loader does not say)."""

    def __init__(self, built: Callable[[float], None]) -> None:
        self.built = built
        self.lr = math.nan
        self.batch_size: int | None = None
        self.optimizer = ""  # the class of the optimizer the fit steps with (the first one's)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.lr = optimizers.built_lr(trainer.optimizers)
        first = type(trainer.optimizers[0]) if trainer.optimizers else None
        self.optimizer = f"{first.__module__}.{first.__qualname__}" if first is not None else ""
        self.built(self.lr)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.batch_size = batches.served_batch_size(trainer.train_dataloader)


class AveragedWeightsHooks:
    """For optimizers that keep two sets of weights, the ones each step moves and their average, which is what the
    model is (Schedule-Free's, which have train() and eval()): training steps in train(); validation, testing, every
    checkpoint and the end of the fit (the model logged) in eval(). Entering eval(), BatchNorm's running statistics
    are measured again at the averaged weights from the last training inputs, as the optimizer's authors advise:
    those kept while training belong to the other weights."""

    BATCHNORM_BATCHES = 8  # the last training batches' inputs kept for it (a (inputs, targets) batch's inputs)

    def __init__(self) -> None:
        self.inputs: collections.deque[torch.Tensor] = collections.deque(maxlen=self.BATCHNORM_BATCHES)

    @staticmethod
    def averaging(trainer: Any) -> list[Any]:
        return [o for o in trainer.optimizers if callable(getattr(o, "eval", None)) and hasattr(o, "train")]

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        for optimizer in self.averaging(trainer):
            optimizer.train()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.averaging(trainer) and isinstance(batch, (tuple, list)) and isinstance(batch[0], torch.Tensor):
            self.inputs.append(batch[0].detach())

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._averaged(trainer, pl_module)

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._averaged(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._averaged(trainer, pl_module)  # before the reporter's checkpoint: Lightning runs checkpoints last

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._averaged(trainer, pl_module)

    def _averaged(self, trainer: Any, pl_module: Any) -> None:
        found = self.averaging(trainer)
        if not found or not any(group.get("train_mode", True) for o in found for group in o.param_groups):
            return  # none, or in eval() already: its statistics were measured then
        for optimizer in found:
            optimizer.eval()
        norms = [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        norms = [m for m in norms if m.track_running_stats]
        if not norms or not self.inputs:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
        was_training = pl_module.training
        pl_module.train()
        with torch.no_grad():
            for inputs in self.inputs:
                pl_module(inputs)
        pl_module.train(was_training)
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum


class SharingHooks:
    """Hands every training step to processes.threads.Sharing, which narrows the threads while other processes keep
    the CPUs busy and widens them back after."""

    def __init__(self, tick: Callable[[], None]) -> None:
        self.tick = tick

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.tick()


class GuardHooks:
    """Keeps training honest and resumable: pins the shuffle to the epoch, checks that training_step returns a
    scalar loss, stops on a non-finite loss (after the reporter has shown that epoch; its checkpoint is the
    epoch before), and lets a stop signal end every rank at the same batch."""

    CHECK_EVERY = 25  # batches between finiteness checks: each check is one host sync
    STOP_EVERY = 10  # training batches between two stop votes: with several ranks each is a collective

    def __init__(self, iterables: list[Any], check_stop: Callable[[], None] = lambda: None) -> None:
        self.iterables = iterables
        self.check_stop = check_stop

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        stopping.reclaim()  # the Trainer registers its own handlers after on_fit_start, before this hook

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        stopping.reclaim()

    def on_validation_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        self.check_stop()

    def on_test_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        self.check_stop()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        for served in self.iterables:
            if isinstance(served, batches.DeviceBatches) and served.shuffle:
                served.set_epoch(trainer.current_epoch)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if loss.numel() != 1:
            owner = type(pl_module).__qualname__
            raise UserCodeError(
                f"{owner}.training_step returned a loss of shape {tuple(loss.shape)}: it must be a scalar"
            )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not pl_module.automatic_optimization:  # it steps its optimizers itself: training_step may return None
            self.check_stop()
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            owner = type(pl_module).__qualname__
            raise UserCodeError(
                f'{owner}.training_step returned no loss: return the loss tensor, or a dict with "loss"'
            )
        if batch_idx % self.STOP_EVERY == 0:
            self.check_stop()
        if batch_idx % self.CHECK_EVERY == 0:
            value = float(loss)
            self._check(value, trainer, f"step {trainer.global_step}")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # The epoch values are reduced over the ranks already (sync_dist) or rank-local: decided together below.
        bad = {k: v for k, v in epoch_values(trainer).items() if not math.isfinite(v)}
        self._check(next(iter(bad.values()), 0.0), trainer, f"the epoch's {next(iter(bad), 'values')}")

    def _check(self, loss: float, trainer: Any, where: str) -> None:
        # Every rank's loss, decided together: a rank stopping alone would leave the others inside a collective.
        if ranks.agree(not math.isfinite(loss), trainer.world_size):
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            raise TrainingDiverged(
                f"training loss is {loss if not math.isfinite(loss) else 'non-finite on another rank'} at epoch "
                f"{trainer.current_epoch} ({where}, lr {lr:.3g}): the learning rate is too high for this model; lower "
                "lr, or use auto_lr=true"
            )
