"""The networks: LeNet's faster CPU pooling computes exactly what nn.MaxPool2d computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlproject.model import MaxPool2d, lenet

CL = torch.channels_last


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("values", ["random", "ties"])
@pytest.mark.parametrize("shape", [(64, 6, 28, 28), (24, 6, 28, 28), (3, 15, 9, 9)])
def test_folded_pooling_matches_max_pool2d_in_values_and_gradients(dtype, values, shape):
    torch.manual_seed(0)
    # "ties": small integers, so most windows hold several equal maxima and the picked index matters
    x = torch.randn(shape) if values == "random" else torch.randint(-2, 3, shape).float()
    x = x.to(dtype).contiguous(memory_format=CL).requires_grad_()
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2).to(dtype)
    ours, reference = MaxPool2d(2), nn.MaxPool2d(2)
    assert ours._folds(x)  # the fast path is the one under test

    out = ours(x)
    (got,) = torch.autograd.grad(out, x, grad)
    (expected,) = torch.autograd.grad(reference(x), x, grad)

    assert torch.equal(out, reference(x))
    assert torch.equal(got, expected)
    assert out.is_contiguous(memory_format=CL)


def test_pooling_outside_the_fast_path_is_max_pool2d():
    x = torch.randn(4, 6, 28, 28)  # contiguous (NCHW): not folded
    assert not MaxPool2d(2)._folds(x)
    assert not MaxPool2d(2)._folds(torch.randn(4, 16, 10, 10).contiguous(memory_format=CL))  # 16 channels vectorise
    assert torch.equal(MaxPool2d(2)(x), F.max_pool2d(x, 2))


@pytest.mark.parametrize("autocast", [False, True])
def test_lenet_trains_exactly_like_the_plain_torch_lenet(autocast):
    """Same weights, same batch: the same loss and the same gradients as LeNet built from nn.MaxPool2d."""
    torch.manual_seed(0)
    ours = lenet().to(memory_format=CL)
    plain = nn.Sequential(*[nn.MaxPool2d(2) if isinstance(m, MaxPool2d) else m for m in lenet()])
    plain.load_state_dict(ours.state_dict())
    plain = plain.to(memory_format=CL)
    x = torch.randn(64, 1, 28, 28).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (64,))

    def loss_and_grads(net: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(net(x), y)
        return loss, list(torch.autograd.grad(loss, list(net.parameters())))

    loss, grads = loss_and_grads(ours)
    plain_loss, plain_grads = loss_and_grads(plain)
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads, strict=True))
