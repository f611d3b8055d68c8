"""The LR range test on any LightningModule, run by Lightning's Tuner.lr_find on a private copy; yields the raw
curve (an LRCurve) of the global batch: every step's loss averaged over the ranks."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mlproject.errors import UserCodeError
from mlproject.finder import rules
from mlproject.processes import ranks, stopping
from mlproject.training.batches import served_batch_size
from mlproject.training.lightning_api import Lightning
from mlproject.training.runtime import Runtime
from mlproject.training.trainer import build_trainer

NEVER = 10**9  # a validation interval no sweep reaches: the range test trains, it does not validate


@dataclass(frozen=True)
class LRCurve:
    lrs: list[float]
    losses: list[float]  # raw per-step training losses of the global batch, NaN/inf kept as they came
    probe_losses: list[float]  # loss on a fixed held-out batch after each step (empty unless probing)
    stop_reason: str  # why the job's early stop ended the sweep (rules.stop_reason), or ""
    lr_min: float
    lr_max: float
    steps_requested: int
    seconds: float
    batches_per_epoch: int  # of the training data, on each rank
    world_size: int
    batch_size: int | None = None  # what the training loader served on each rank (None where it does not say)
    momentum: float = 0.0  # the optimizer's heavy-ball momentum as it swept (rules.momentum_lag); 0 for none, or Adam

    @property
    def steps_run(self) -> int:
        return len(self.lrs)

    @property
    def stopped_early(self) -> bool:
        return self.steps_run < self.steps_requested


class MemoryCheckpointIOHooks:
    """lr_find snapshots the model before the sweep and restores it after; the snapshot stays in memory, on every
    rank, so no file is written and no node needs another's (Lightning's own writes a file on rank 0 and reads
    it on every rank: several nodes without a shared file system fail, Lightning-AI/pytorch-lightning#18812)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.snapshot = copy.deepcopy(checkpoint)  # rank 0; the others take theirs in the module's hooks

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        assert self.snapshot is not None, "lr_find restores a snapshot it saved"
        return self.snapshot

    def remove_checkpoint(self, path: Any) -> None:
        self.snapshot = None


def _loss_of(output: Any, owner: str) -> torch.Tensor:
    """The loss a training_step returned (a tensor or a dict with "loss"), checked as the job needs it."""
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if loss is None:
        raise UserCodeError(
            f"{owner}.training_step returned {'None' if output is None else type(output).__name__} without a loss: "
            'return the loss tensor, or a dict with "loss"'
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise UserCodeError(f"{owner}.training_step returned a loss of shape {shape}: it must be a scalar tensor")
    return loss


def heavy_ball(group: dict[str, Any]) -> float:
    """A param group's momentum where the step is the LR times a buffer of raw gradients (SGD's, RMSprop's): that
    buffer, not the LR, sets how fast the step grows. Adam's first moment is divided by its second, so its step
    follows the LR at once: 0."""
    if "betas" in group:
        return 0.0
    return float(group.get("momentum") or 0.0)


class _Recorder:
    """Sits in the private copy's hooks, since lr_find replaces the Trainer's callbacks with its own: records the
    raw loss of every optimizer step, averaged over the ranks; with `stop_early`, ends the sweep once
    rules.stop_reason gives a reason (rank 0 decides for every rank). With accumulate_grad_batches = k, an optimizer
    step is k batches at one LR, and its loss their mean (Lightning hands each batch's loss on divided by k)."""

    def __init__(self, io: MemoryCheckpointIOHooks, probe: Callable[[], float] | None, stop_early: bool) -> None:
        self.io, self.probe, self.stop_early = io, probe, stop_early
        self.check_stop: Callable[[], None] = lambda: None
        self.tick: Callable[[], None] = lambda: None  # processes.threads.Sharing's, where the runtime has one
        self.lrs: list[float] = []
        self.raw: list[float] = []
        self.probed: list[float] = []
        self.stop_reason = ""
        self.batches_per_epoch = 0
        self.world_size = 1
        self.batch_size: int | None = None
        self.momentum = 0.0
        self._pending: dict[str, Any] | None = None
        self._batches = 0  # training_step calls so far
        self._summed: torch.Tensor | None = None  # this optimizer step's losses so far

    def instrument(self, module: Any) -> None:
        owner = type(module).__qualname__
        originals = {name: getattr(module, name) for name in ("training_step", "on_train_batch_end")}
        originals |= {name: getattr(module, name) for name in ("on_train_start", "on_save_checkpoint")}

        def training_step(*args: Any, **kwargs: Any) -> Any:
            if self._batches % module.trainer.accumulate_grad_batches == 0:  # an optimizer step's first batch
                self.lrs.append(module.trainer.optimizers[0].param_groups[0]["lr"])  # before the scheduler steps
            self._batches += 1
            output = originals["training_step"](*args, **kwargs)
            _loss_of(output, owner)
            return output

        def on_train_batch_end(outputs: Any, batch: Any, batch_idx: int) -> None:
            originals["on_train_batch_end"](outputs, batch, batch_idx)
            loss = _loss_of(outputs, owner).detach().float()
            self._summed = loss if self._summed is None else self._summed + loss
            if self._batches % module.trainer.accumulate_grad_batches == 0:  # the optimizer has stepped
                self.step(module.trainer, self._summed)
                self._summed = None
            self.tick()

        def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
            originals["on_save_checkpoint"](checkpoint)
            self._pending = checkpoint  # complete now; copied before the first step changes the weights

        def on_train_start() -> None:
            stopping.reclaim()  # lr_find's Trainer registered its own signal handlers
            originals["on_train_start"]()
            trainer = module.trainer
            self.batches_per_epoch, self.world_size = int(trainer.num_training_batches), trainer.world_size
            self.batch_size = served_batch_size(trainer.train_dataloader)
            self.momentum = heavy_ball(trainer.optimizers[0].param_groups[0])
            if self.io.snapshot is None and self._pending is not None:
                self.io.snapshot = copy.deepcopy(self._pending)

        for name, hook in (("training_step", training_step), ("on_train_batch_end", on_train_batch_end)):
            object.__setattr__(module, name, hook)
        for name, hook in (("on_save_checkpoint", on_save_checkpoint), ("on_train_start", on_train_start)):
            object.__setattr__(module, name, hook)

    def step(self, trainer: Any, loss: torch.Tensor) -> None:
        """One host sync a step, as Lightning's own finder makes; with a probe, also its loss under the weights this
        step's LR produced."""
        self.check_stop()
        self.raw.append(float(trainer.strategy.reduce(loss, reduce_op="mean")))
        if self.probe is not None:
            self.probed.append(self.probe())
        if self.stop_early:
            read = self.probed if self.probe is not None else self.raw
            self.stop_reason = trainer.strategy.broadcast(rules.stop_reason(self.lrs, read))
            trainer.should_stop = trainer.should_stop or bool(self.stop_reason)


def probe_loss(module: Any, batch: Any) -> Callable[[], float]:
    """The built-in classifier's loss on a fixed held-out batch, in eval mode (BatchNorm untouched)."""

    def measure() -> float:
        module.eval()
        with torch.no_grad():
            value = float(module.loss(batch))
        module.train()
        return value

    return measure


def range_test(
    module: Any,
    sweep_inputs: dict[str, Any],
    *,
    lightning: Lightning,
    rt: Runtime,
    lr_min: float,
    lr_max: float,
    steps: int,
    probe: Any = None,
    stop_early: bool = True,
    trainer_args: dict[str, Any] | None = None,
) -> LRCurve:
    """Sweep the LR exponentially from lr_min to lr_max, one optimizer step each, with the module's own optimizer
    (its schedulers off); `module` is not touched.

    The global RNG is forked, so running the sweep does not change what the fit afterwards does. With `probe`
    (a fixed held-out batch, built-in classifier only), the loss on it after every step is recorded too: Smith's
    validation-based test. With `stop_early`, the sweep ends once the curve has diverged past use
    (rules.stop_reason), decided on the global batch's loss; Lightning's own stop, on rank 0's loss alone, is off.
    """
    start = time.perf_counter()
    private = copy.deepcopy(module)
    io = lightning.make(MemoryCheckpointIOHooks, "plugins.CheckpointIO")
    recorder = _Recorder(io, probe_loss(private, probe) if probe is not None else None, stop_early)
    recorder.instrument(private)
    if rt.sharing is not None:
        recorder.tick = rt.sharing.tick
    devices = [torch.cuda.current_device()] if rt.accelerator == "gpu" else []
    with torch.random.fork_rng(devices=devices), ranks.stop_together(rt.world_size) as check_stop:
        recorder.check_stop = check_stop
        trainer = build_trainer(lightning, rt, -1, [], trainer_args, plugins=[io], check_val_every_n_epoch=NEVER)
        finder = lightning.tuner(trainer).lr_find(
            private,
            **sweep_inputs,
            min_lr=lr_min,
            max_lr=lr_max,
            num_training=steps,
            early_stop_threshold=None,
            update_attr=False,
        )
    assert finder is not None  # None only under fast_dev_run, which is never set here
    lrs = [float(v) for v in finder.results["lr"]]
    return LRCurve(
        lrs=lrs,
        losses=recorder.raw[: len(lrs)],
        probe_losses=recorder.probed[: len(lrs)],
        stop_reason=recorder.stop_reason,
        lr_min=lr_min,
        lr_max=lr_max,
        steps_requested=steps,
        seconds=time.perf_counter() - start,
        batches_per_epoch=recorder.batches_per_epoch,
        world_size=recorder.world_size,
        batch_size=recorder.batch_size,
        momentum=recorder.momentum,
    )
