"""The networks the job builds itself: three of its own (LeNet, an MLP, a CNN with BatchNorm) and any torchvision
classifier, sized to the data."""

from __future__ import annotations

from typing import Any

from torch import nn

from mlproject.config import BUILTIN_MODELS, ConfigError


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
                groups = child.groups if child.groups == 1 else channels
                conv = nn.Conv2d(
                    channels,
                    child.out_channels,
                    **_shape_of(child),
                    groups=groups,
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                )
                setattr(parent, child_name, conv)
                return True
    return False


def _shape_of(conv: nn.Conv2d) -> dict[str, Any]:
    """A convolution's kernel, stride, padding and dilation, as its constructor takes them."""
    return {"kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}


def builtin_net(name: str, channels: int, classes: int, size: int) -> nn.Module:
    if size < MIN_SIZE[name]:
        raise ConfigError("image_size", size, f"at least {MIN_SIZE[name]} pixels for model {name}")
    return NETS[name](channels, classes, size)
