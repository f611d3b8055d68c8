"""A LightningModule written against `lightning.pytorch`, using a package the job image lacks (einops)."""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class YourModule(L.LightningModule):
    """A one-hidden-layer MLP for 28x28 grey images in ten classes."""

    def __init__(self, hidden: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr  # the attribute an LR range test sets and configure_optimizers reads
        self.net = nn.Sequential(nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(rearrange(images, "b c h w -> b (c h w)"))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True)
        if stage != "train":
            self.log(f"{stage}_acc", (logits.argmax(dim=1) == labels).float().mean(), on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
