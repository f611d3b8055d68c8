"""Token sequences drawn from one of several Markov chains over the same tokens; the label is the chain, seeded.

Every chain visits every token equally often (its transition matrix is a mixture of permutations), so counting
tokens says nothing: telling the chains apart needs pairs of neighbouring tokens, which attention has to relate.
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset


def chains(classes: int, vocab: int, mix: int, gen: torch.Generator) -> torch.Tensor:
    """(classes, vocab, vocab) transition matrices, each the mean of `mix` random permutation matrices."""
    eye = torch.eye(vocab)
    return torch.stack(
        [sum(eye[torch.randperm(vocab, generator=gen)] for _ in range(mix)) / mix for _ in range(classes)]
    )


def sample(transitions: torch.Tensor, samples: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    classes, vocab, _ = transitions.shape
    labels = torch.randint(0, classes, (samples,), generator=gen)
    tokens = torch.empty(samples, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (samples,), generator=gen)
    for t in range(1, length):
        tokens[:, t] = torch.multinomial(transitions[labels, tokens[:, t - 1]], 1, generator=gen)[:, 0]
    return tokens, labels


class MarkovChains(L.LightningDataModule):
    def __init__(self, samples: int = 8000, length: int = 16, vocab: int = 8, classes: int = 4, mix: int = 3,
                 batch_size: int = 64, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.samples, self.length, self.vocab, self.classes, self.mix = samples, length, vocab, classes, mix
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        tokens, labels = sample(chains(self.classes, self.vocab, self.mix, gen), self.samples, self.length, gen)
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
