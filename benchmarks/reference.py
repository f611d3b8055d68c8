"""The reference pipeline: what a user writes with Lightning 2.x alone. Prints its timings as one JSON line.

torchvision's FashionMNIST through DataLoaders with ToTensor() per sample, batch 64, Lightning's MLFlowLogger,
Tuner.lr_find (100 steps) and its suggestion(), then Trainer.fit at that LR. After each epoch a callback
measures test accuracy (its own time is reported, so time-to-target can leave it out).

    python -m benchmarks.reference --root DIR --tracking-uri URI --max-epochs 8 --min-epochs 4 --target 0.89
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_lightning.loggers import MLFlowLogger  # noqa: E402
from pytorch_lightning.tuner import Tuner  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, random_split  # noqa: E402
from torchvision import transforms  # noqa: E402
from torchvision.datasets import FashionMNIST  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - START


class LitLeNet(pl.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class EpochClock(pl.Callback):
    """Epoch wall times, and test accuracy after each epoch (timed separately)."""

    def __init__(self, test_loader: DataLoader, target: float, min_epochs: int) -> None:
        self.test_loader, self.target, self.min_epochs = test_loader, target, min_epochs
        self.epoch_seconds: list[float] = []
        self.test_acc: list[float] = []
        self.eval_seconds = 0.0
        self.reached_at: float | None = None

    def on_train_epoch_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.epoch_seconds.append(time.perf_counter() - self.t0)
        t = time.perf_counter()
        pl_module.eval()
        correct = 0
        with torch.no_grad():
            for x, y in self.test_loader:
                correct += int((pl_module(x).argmax(1) == y).sum())
        pl_module.train()
        acc = correct / len(self.test_loader.dataset)
        self.test_acc.append(acc)
        self.eval_seconds += time.perf_counter() - t
        if acc >= self.target and self.reached_at is None:
            self.reached_at = time.perf_counter() - START - self.eval_seconds
        # Once the target is reached and min_epochs are done, nothing more is measured.
        trainer.should_stop = self.reached_at is not None and len(self.test_acc) >= self.min_epochs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--min-epochs", type=int, default=4, help="epochs to run even after reaching the target")
    parser.add_argument("--target", type=float, default=0.89)
    args = parser.parse_args()
    pl.seed_everything(42, verbose=False)
    to_tensor = transforms.ToTensor()
    full = FashionMNIST(args.root, train=True, transform=to_tensor)
    train, val = random_split(full, [55000, 5000], generator=torch.Generator().manual_seed(42))
    test = FashionMNIST(args.root, train=False, transform=to_tensor)
    train_loader = DataLoader(train, batch_size=64, shuffle=True)
    val_loader = DataLoader(val, batch_size=64)
    clock = EpochClock(DataLoader(test, batch_size=64), args.target, args.min_epochs)
    model = LitLeNet()
    logger = MLFlowLogger(experiment_name="reference", tracking_uri=args.tracking_uri)
    trainer = pl.Trainer(
        max_epochs=args.max_epochs, logger=logger, callbacks=[clock], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    t = time.perf_counter()
    finder = Tuner(trainer).lr_find(model, train_dataloaders=train_loader)
    range_test_seconds = time.perf_counter() - t
    model.lr = finder.suggestion()
    trainer.fit(model, train_loader, val_loader)
    result = {
        "import_seconds": IMPORT_SECONDS,
        "range_test_seconds": range_test_seconds,
        "lr": model.lr,
        "epoch_seconds": clock.epoch_seconds,
        "test_acc": clock.test_acc,
        "time_to_target": clock.reached_at,
        "train_samples": len(train),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
