"""Random token sequences labelled with their most frequent token (the smallest one on a tie), seeded."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def majority(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    counts = torch.nn.functional.one_hot(tokens, vocab).sum(dim=1)
    return counts.argmax(dim=1)  # argmax returns the first maximum: the smallest token on a tie


class MajorityTokens(pl.LightningDataModule):
    def __init__(self, samples: int = 6000, length: int = 24, vocab: int = 8, batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.samples, self.length, self.vocab, self.batch_size, self.seed = samples, length, vocab, batch_size, seed

    def setup(self, stage: str) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        tokens = torch.randint(0, self.vocab, (self.samples, self.length), generator=gen)
        labels = majority(tokens, self.vocab)
        n_val = n_test = self.samples // 10
        n_train = self.samples - n_val - n_test
        self.train_set = TensorDataset(tokens[:n_train], labels[:n_train])
        self.val_set = TensorDataset(tokens[n_train : n_train + n_val], labels[n_train : n_train + n_val])
        self.test_set = TensorDataset(tokens[n_train + n_val :], labels[n_train + n_val :])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512)
