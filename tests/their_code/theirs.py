"""LightningModules written the ways other people write them, for tests/test_their_code.py: the LR in hparams, an
optimizer factory passed in, an optimizer class passed in, settings read at init, LightningCLI's OptimizerCallable,
manual optimization with two optimizers (a GAN's), values logged per step only, a module's own dataloaders, a path
relative to its folder, an LR fixed in configure_optimizers. Small random regressions: each trains in seconds."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


def points(samples: int = 512, features: int = 8, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    y = x @ torch.linspace(-1, 1, features) + 0.1 * torch.randn(samples, generator=generator)
    return TensorDataset(x, y)


class Points(L.LightningDataModule):
    def __init__(self, samples: int = 512, batch_size: int = 32) -> None:
        super().__init__()
        self.samples, self.batch_size = samples, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(points(self.samples, seed=0), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(points(128, seed=1), batch_size=64)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(points(128, seed=2), batch_size=64)


class Regressor(L.LightningModule):
    """What every module below shares: a small MLP, its loss, its validation and test."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self(batch[0]), batch[1]))

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", F.mse_loss(self(batch[0]), batch[1]))


class InHparams(Regressor):
    def __init__(self, learning_rate: float = 5e-4) -> None:
        super().__init__()
        self.save_hyperparameters()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)


ADAM = functools.partial(torch.optim.Adam, lr=5e-4)


class FactoryGiven(Regressor):
    def __init__(self, optimizer: functools.partial = ADAM) -> None:
        super().__init__()
        self.optimizer = optimizer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.parameters())


class CallableGiven(Regressor):
    """LightningCLI's way: the optimizer's class and arguments come from the config, the parameters from here."""

    def __init__(self, optimizer: OptimizerCallable = torch.optim.Adam) -> None:
        super().__init__()
        self.optimizer = optimizer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.parameters())


class ClassGiven(Regressor):
    """An LR in its hparams that its optimizer never reads: built at the class's own default."""

    def __init__(self, optimizer_class: type = torch.optim.Adam, lr: float = 5e-4) -> None:
        super().__init__()
        self.save_hyperparameters()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.hparams.optimizer_class(self.parameters())


class ReadAtInit(Regressor):
    """Its LR read once, at init, into settings its optimizer is built from."""

    def __init__(self, lr: float = 5e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.settings = {"lr": lr}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), **self.settings)


class FixedLR(Regressor):
    """No LR attribute anywhere: SGD at 0.05, written into configure_optimizers."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class TwoOptimizers(L.LightningModule):
    """A GAN's shape: a generator and a critic, each with its own Adam at the author's LR, stepped by hand."""

    def __init__(self, lr: float = 2e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.critic = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        g_opt, c_opt = self.optimizers()
        real = batch[0]
        fake = self.generator(torch.randn(len(real), 4))
        critic_loss = F.softplus(self.critic(fake.detach())).mean() + F.softplus(-self.critic(real)).mean()
        c_opt.zero_grad()
        self.manual_backward(critic_loss)
        c_opt.step()
        generator_loss = F.softplus(-self.critic(fake)).mean()
        g_opt.zero_grad()
        self.manual_backward(generator_loss)
        g_opt.step()
        self.log_dict({"g_loss": generator_loss, "d_loss": critic_loss})  # per step: Lightning's default here

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.softplus(-self.critic(batch[0])).mean())

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (0.5, 0.999)
        return [
            torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, betas=betas),
            torch.optim.Adam(self.critic.parameters(), lr=self.hparams.lr, betas=betas),
        ]


class StepLogged(InHparams):
    """Its training loss logged per step only, as an autoencoder's example logs it."""

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss)  # on_step=True, on_epoch=False: Lightning's default in training_step
        return loss


class OwnLoaders(InHparams):
    """Brings its own data: no data module, no dataset named."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(points(256, seed=3), batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(points(64, seed=4), batch_size=64)


class RelativePath(OwnLoaders):
    """Reads a file by a path relative to the folder its code lives in, as code run from its own checkout does."""

    def __init__(self, learning_rate: float = 5e-4) -> None:
        super().__init__(learning_rate)
        self.offset = float(Path("data/offset.txt").read_text())


class OddNames(InHparams):
    """Logs a value under a name people read, not one MLflow takes: parentheses and a percent sign."""

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        error = (self(batch[0]) - batch[1]).abs() / batch[1].abs().clamp(min=1.0)
        self.log("val error (%)", 100 * error.mean())
