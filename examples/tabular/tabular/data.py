"""Synthetic tabular data: a smooth nonlinear function of the features plus noise, seeded."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class SyntheticTabular(L.LightningDataModule):
    def __init__(self, samples: int = 4000, features: int = 16, batch_size: int = 64, noise: float = 0.1,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.samples, self.features, self.batch_size, self.noise, self.seed = samples, features, batch_size, noise, seed

    def setup(self, stage: str) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.samples, self.features, generator=gen)
        w = torch.randn(self.features, generator=gen) / self.features**0.5
        y = torch.sin(x @ w * 2) + 0.5 * (x[:, 0] * x[:, 1]) + self.noise * torch.randn(self.samples, generator=gen)
        n_val = n_test = self.samples // 10
        n_train = self.samples - n_val - n_test
        self.train_set = TensorDataset(x[:n_train], y[:n_train])
        self.val_set = TensorDataset(x[n_train : n_train + n_val], y[n_train : n_train + n_val])
        self.test_set = TensorDataset(x[n_train + n_val :], y[n_train + n_val :])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512)
