"""The built-in classifier: a LightningModule of either Lightning package around any image network, with its
optimizer and augmentation. It only calls self.log() and knows nothing of MLflow."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mlproject.training.lightning_api import Lightning

if TYPE_CHECKING:  # the hooks run as a LightningModule of either package (lightning_api.make binds them)
    from pytorch_lightning import LightningModule as Module
else:
    Module = object


def make_optimizer(params: Iterable[nn.Parameter], optimizer: str, lr: float) -> torch.optim.Optimizer:
    """fused=True: one kernel per parameter instead of a Python loop of small ops (on a CPU too). The LR-free ones
    (config.LR_FREE) with their authors' defaults otherwise."""
    if optimizer == "schedulefree":
        import schedulefree  # only for this choice

        return schedulefree.AdamWScheduleFree(params, lr=lr)
    if optimizer == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(params, lr=lr)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
    # Momentum 0.9: the SGD that people actually run; plain SGD needs far more epochs.
    return torch.optim.SGD(params, lr=lr, momentum=0.9, fused=True)


def random_crop_flip(x: torch.Tensor) -> torch.Tensor:
    """The standard augmentation, batched on the device: a horizontal flip half of the time, then a random crop of
    the image padded by an eighth of its side (reflected)."""
    n, c, h, w = x.shape
    flip = torch.rand(n, device=x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), device=x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    index = torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None]
    return padded[index[0], index[1], rows, cols]


class ClassifierHooks(Module):
    """Cross-entropy classification; logs epoch aggregates of loss and accuracy per stage.

    The training loss is summed on the device and logged once, at the epoch's last batch: a self.log() call
    per step costs more than LeNet's arithmetic on a CPU. `lr` is an attribute, as Lightning's LR finder and the
    job look for it; configure_optimizers builds the optimizer at it.
    """

    def __init__(
        self, net: nn.Module, optimizer: str, lr: float, channels_last: bool = False, augment: bool = False
    ) -> None:
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.optimizer_name = optimizer
        self.lr = lr
        self.channels_last = channels_last
        self.augment = augment
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

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.augment and self.trainer.training:
            x, y = batch
            return random_crop_flip(x), y
        return batch

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)  # no accuracy here: four more small ops a step that nothing reads
        n = len(batch[1])
        self._loss_sum += loss.detach() * n
        self._seen += n
        if batch_idx + 1 == self.trainer.num_training_batches:
            self.log("train_loss", self._loss_sum / self._seen, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def _eval_step(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        logits = self(x)
        loss, acc = F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).float().mean()
        n = len(y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._seen = torch.zeros((), device=self.device), 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.optimizer_name, self.lr)


def classifier(
    lightning: Lightning, net: nn.Module, optimizer: str, lr: float, channels_last: bool = False, augment: bool = False
) -> Any:
    """The classifier as a LightningModule of `lightning`'s package."""
    return lightning.make(ClassifierHooks, "LightningModule", net, optimizer, lr, channels_last, augment)
