"""A two-layer pre-norm transformer encoder over token and position embeddings, mean-pooled into a linear head;
AdamW with weight decay, as transformers are usually trained."""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn


class TinyTransformer(L.LightningModule):
    def __init__(self, vocab: int = 8, length: int = 16, classes: int = 4, width: int = 32, heads: int = 4,
                 layers: int = 2, lr: float = 1e-3, weight_decay: float = 0.01) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tokens(tokens) + self.positions[: tokens.shape[1]]
        return self.head(self.norm(self.encoder(x)).mean(dim=1))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        tokens, label = batch
        logits = self(tokens)
        loss = F.cross_entropy(logits, label)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log(f"{stage}_acc", (logits.argmax(-1) == label).float().mean(), on_step=False, on_epoch=True,
                 sync_dist=True)  # fmt: skip
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.hparams.weight_decay)
