"""The networks the job builds itself (three of its own, any torchvision classifier) and the LightningModule that
trains them; it only calls self.log() and knows nothing of MLflow."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlproject.config import BUILTIN_MODELS, ConfigError
from mlproject.lightning_api import Lightning


def lenet(channels: int = 1, classes: int = 10, size: int = 28) -> nn.Module:
    """LeNet-5 with ReLU and max-pooling, as in the reference experiment.

    Each block pools before its ReLU: the two commute (ReLU is monotonic), so values and gradients are the
    textbook order's bit for bit, and the ReLU runs on a quarter of the elements (benchmarks/RESULTS.md).
    """
    side = (size // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(6, 16, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, classes),
    )  # fmt: skip


def mlp(channels: int = 1, classes: int = 10, size: int = 28) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, 256), nn.ReLU(), nn.Linear(256, classes))


def cnn_bn(channels: int = 1, classes: int = 10, size: int = 28) -> nn.Module:
    """A small CNN with BatchNorm: its range-test curve is shaped unlike LeNet's."""
    side = size // 4
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * side * side, classes),
    )  # fmt: skip


NETS = {"lenet": lenet, "mlp": mlp, "cnn_bn": cnn_bn}
assert tuple(NETS) == BUILTIN_MODELS
MIN_SIZE = {"lenet": 12, "mlp": 1, "cnn_bn": 4}  # below these the network has no features left


def torchvision_models() -> list[str]:
    """The classification builders of torchvision.models (its detection, segmentation, video ... live apart)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_net(name: str, channels: int, classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """torchvision's builder with weights=None and `classes` outputs; the stem's first convolution takes
    `channels` (its other hyperparameters kept) when the data is not RGB."""
    import torchvision

    try:
        net = torchvision.models.get_model(name, weights=None, num_classes=classes, **kwargs)
    except TypeError as exc:
        raise ConfigError("model_args", kwargs, f"init arguments torchvision's {name} accepts ({exc})") from exc
    if channels != 3 and not _replace_first_conv(net, channels):
        raise ConfigError("model", name, f"a network with a convolution to take {channels}-channel images")
    return net


def _replace_first_conv(net: nn.Module, channels: int) -> bool:
    for parent in net.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                conv = nn.Conv2d(
                    channels, child.out_channels, child.kernel_size, child.stride, child.padding, child.dilation,
                    child.groups if child.groups == 1 else channels, child.bias is not None, child.padding_mode,
                )  # fmt: skip
                setattr(parent, child_name, conv)
                return True
    return False


def builtin_net(name: str, channels: int, classes: int, size: int) -> nn.Module:
    if size < MIN_SIZE[name]:
        raise ConfigError("image_size", size, f"at least {MIN_SIZE[name]} pixels for model {name}")
    return NETS[name](channels, classes, size)


def make_optimizer(params: object, optimizer: str, lr: float) -> torch.optim.Optimizer:
    """fused=True: one kernel per parameter instead of a Python loop of small ops (on a CPU too)."""
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)  # type: ignore[arg-type]
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)  # type: ignore[arg-type]
    # Momentum 0.9: the SGD that people actually run; plain SGD needs far more epochs.
    return torch.optim.SGD(params, lr=lr, momentum=0.9, fused=True)  # type: ignore[arg-type]


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


class ClassifierHooks:
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
