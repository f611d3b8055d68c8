"""The networks and the LightningModule that trains them; it only calls self.log() and knows nothing of MLflow."""

from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from mlproject.catalog import NUM_CLASSES


def lenet() -> nn.Module:
    """LeNet-5 with ReLU and max-pooling, as in the reference experiment.

    Each block pools before its ReLU: the two commute (ReLU is monotonic), so values and gradients are the
    textbook order's bit for bit, and the ReLU runs on a quarter of the elements (benchmarks/RESULTS.md).
    """
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(6, 16, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, NUM_CLASSES),
    )  # fmt: skip


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 256), nn.ReLU(), nn.Linear(256, NUM_CLASSES))


def cnn_bn() -> nn.Module:
    """A small CNN with BatchNorm: its range-test curve is shaped unlike LeNet's."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, NUM_CLASSES),
    )  # fmt: skip


NETS = {"lenet": lenet, "mlp": mlp, "cnn_bn": cnn_bn}


@dataclass(frozen=True)
class OptimSpec:
    """How to build the optimizer and schedule once the learning rate is known."""

    optimizer: str
    lr: float
    schedule: str = "constant"
    total_steps: int = 0  # the one-cycle schedule's length; 0 for constant
    lr_low: float = 0.0  # the one-cycle start; 0 lets it default to lr / 25 (Smith's div_factor)


def make_optimizer(params: object, optimizer: str, lr: float) -> torch.optim.Optimizer:
    """fused=True: one kernel per parameter instead of a Python loop of small ops (on a CPU too)."""
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)  # type: ignore[arg-type]
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)  # type: ignore[arg-type]
    # Momentum 0.9: the SGD that people actually run; plain SGD needs far more epochs.
    return torch.optim.SGD(params, lr=lr, momentum=0.9, fused=True)  # type: ignore[arg-type]


class Classifier(pl.LightningModule):
    """Cross-entropy classification; logs epoch aggregates of loss and accuracy per stage.

    The training loss is summed on the device and logged once, at the epoch's last batch: a self.log() call
    per step costs more than LeNet's arithmetic on a CPU.
    """

    def __init__(self, net: nn.Module, optim: OptimSpec, channels_last: bool = False) -> None:
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.optim = optim
        self.channels_last = channels_last
        self._loss_sum = torch.zeros(())
        self._seen = 0

    def compile_net(self) -> None:
        """Run the network through torch.compile from now on. The compiled wrapper stays outside the module's
        children, so checkpoints and the logged model hold the plain network's weights under their own names."""
        object.__setattr__(self, "_compiled", torch.compile(self.net))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.__dict__.get("_compiled", self.net)(x)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)  # no accuracy here: four more small ops a step that nothing reads
        n = len(batch[1])
        self._loss_sum += loss.detach() * n
        self._seen += n
        if batch_idx + 1 == self.trainer.num_training_batches:
            self.log("train_loss", self._loss_sum / self._seen, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        logits = self(x)
        loss, acc = F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).float().mean()
        n = len(y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=n)
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, batch_size=n)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._seen = torch.zeros((), device=self.device), 0
        self.log("learning_rate", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)

    def configure_optimizers(self) -> object:
        spec = self.optim
        opt = make_optimizer(self.parameters(), spec.optimizer, spec.lr)
        if spec.schedule == "constant":
            return opt
        div = spec.lr / spec.lr_low if spec.lr_low > 0 else 25.0
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.total_steps, div_factor=div)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
