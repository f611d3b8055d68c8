"""The shape of Lightning's own `examples/pytorch/basics/backbone_image_classifier.py`, for benchmarks.overhead: a
two-layer backbone under a classifier whose LR is in its hparams, logging its training loss per epoch and its
validation loss per step, on Lightning's own MNIST data module (`lightning.pytorch.demos`), here fed Fashion-MNIST
from Debian's dataset-fashion-mnist through the files that module reads offline."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
from torch.nn import functional as F

from mlproject.catalog import FASHION_MNIST_DIR
from mlproject.training import idx

DATA_MODULE = "lightning.pytorch.demos.mnist_datamodule.MNISTDataModule"


class Backbone(torch.nn.Module):
    def __init__(self, hidden_dim: int = 128) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(28 * 28, hidden_dim)
        self.l2 = torch.nn.Linear(hidden_dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.l2(torch.relu(self.l1(x.view(x.size(0), -1)))))


class LitClassifier(L.LightningModule):
    def __init__(self, learning_rate: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = Backbone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("valid_loss", F.cross_entropy(self(batch[0]), batch[1]), on_step=True)

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)


def mnist_folder(folder: Path) -> Path:
    """`folder` holding MNIST/complete/{training,test}.pt as Lightning's demo MNIST reads them (PL_USE_MOCKED_MNIST
    points it there instead of a download), made from Debian's Fashion-MNIST once."""
    os.environ["PL_USE_MOCKED_MNIST"] = "1"
    target = folder / "MNIST" / "complete"
    if (target / "test.pt").exists():
        return folder
    target.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "training.pt"), ("test", "test.pt")):
        images, labels = idx.read_split(Path(FASHION_MNIST_DIR), split)
        torch.save((torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))), target / name)
    return folder
