"""The LR range test, run by Lightning's Tuner.lr_find on a copy of the model; yields the raw curve (an LRCurve)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import CheckpointIO
from pytorch_lightning.tuner import Tuner

from mlproject import lr_range
from mlproject.model import Classifier, make_optimizer
from mlproject.training import Runtime, build_trainer

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LRCurve:
    lrs: list[float]
    losses: list[float]  # raw per-step training losses, NaN/inf kept as they came
    lightning_losses: list[float]  # Lightning's running-average smoothing, for comparison only
    probe_losses: list[float]  # loss on a fixed held-out batch after each step (empty unless probing)
    stop_reason: str  # why the job's early stop ended the sweep (lr_range.stop_reason), or ""
    lr_min: float
    lr_max: float
    steps_requested: int
    seconds: float

    @property
    def steps_run(self) -> int:
        return len(self.lrs)

    @property
    def stopped_early(self) -> bool:
        return self.steps_run < self.steps_requested


class MemoryCheckpointIO(CheckpointIO):
    """lr_find snapshots and restores the model around the sweep; keep that snapshot in memory, not on disk."""

    def __init__(self) -> None:
        self.store: dict[str, dict[str, Any]] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.store[str(path)] = copy.deepcopy(checkpoint)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return self.store[str(path)]

    def remove_checkpoint(self, path: Any) -> None:
        self.store.pop(str(path), None)


class _Recorder(pl.LightningModule):
    """Trains a private copy of the classifier and records the LR and raw loss of every sweep step; with
    `stop_early`, ends the sweep once lr_range.stop_reason gives a reason (rank 0 decides for every device)."""

    def __init__(self, classifier: Classifier, probe: Batch | None = None, stop_early: bool = True) -> None:
        super().__init__()
        self.inner = copy.deepcopy(classifier)
        self.probe = probe
        self.stop_early = stop_early
        self.lrs: list[float] = []
        self.raw: list[float] = []
        self.probed: list[float] = []
        self.stop_reason = ""

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return self.inner.loss(batch)

    def on_train_batch_end(self, outputs: object, batch: Batch, batch_idx: int) -> None:
        """One host sync a step, as Lightning's own finder makes: the loss the curve needs. With a probe, also
        its loss under the weights this step's LR produced (eval mode: BatchNorm untouched)."""
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.raw.append(float(loss))  # type: ignore[arg-type]
        if self.probe is not None:
            self.inner.eval()
            with torch.no_grad():
                self.probed.append(float(self.inner.loss(self.probe)))
            self.inner.train()
        if self.stop_early:
            read = self.probed if self.probe is not None else self.raw
            # Lightning's finder has broadcast its own stop already: a device deciding alone would hang the rest.
            self.stop_reason = self.trainer.strategy.broadcast(lr_range.stop_reason(self.lrs, read))
            self.trainer.should_stop = self.trainer.should_stop or bool(self.stop_reason)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.inner.optim.optimizer, lr=1.0)  # lr_find sets the LR


def range_test(
    classifier: Classifier,
    train: Iterable[tuple[torch.Tensor, torch.Tensor]],
    rt: Runtime,
    lr_min: float,
    lr_max: float,
    steps: int,
    probe: Batch | None = None,
    stop_early: bool = True,
) -> LRCurve:
    """Sweep the LR exponentially from lr_min to lr_max, one optimizer step each; `classifier` is not touched.

    The global RNG is forked, so running the sweep does not change what the fit afterwards does. With `probe`
    (a fixed held-out batch), the loss on it after every step is recorded too: Smith's validation-based test.
    With `stop_early`, the sweep ends once the curve has diverged past use (lr_range.stop_reason), besides
    Lightning's own stop at 4x the best running-average loss.
    """
    start = time.perf_counter()
    recorder = _Recorder(classifier, probe, stop_early)
    epochs = math.ceil(steps / max(1, len(train))) + 1  # type: ignore[arg-type]
    devices = [torch.cuda.current_device()] if rt.accelerator == "gpu" else []
    with torch.random.fork_rng(devices=devices):
        trainer = build_trainer(rt, epochs, [], plugins=[MemoryCheckpointIO()], limit_val_batches=0)
        finder = Tuner(trainer).lr_find(
            recorder, train_dataloaders=train, min_lr=lr_min, max_lr=lr_max, num_training=steps, update_attr=False
        )
    assert finder is not None  # None only under fast_dev_run, which is never set here
    lrs = [float(v) for v in finder.results["lr"]]
    return LRCurve(
        lrs=lrs,
        losses=recorder.raw[: len(lrs)],
        lightning_losses=[float(v) for v in finder.results["loss"]],
        probe_losses=recorder.probed[: len(lrs)],
        stop_reason=recorder.stop_reason,
        lr_min=lr_min,
        lr_max=lr_max,
        steps_requested=steps,
        seconds=time.perf_counter() - start,
    )
