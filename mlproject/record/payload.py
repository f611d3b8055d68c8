"""The model a run logs, prepared as data: the network to save, and a real batch's input and output for its
signature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class ModelPayload:
    """The model to log and what MLflow infers its signature from; `example` None: logged without one."""

    model: torch.nn.Module
    example: np.ndarray | None
    output: np.ndarray | None
    why_no_signature: str = ""


def model_payload(module: Any, builtin: bool, example: Any) -> ModelPayload:
    """The built-in classifier logs its plain network (it loads without this package); a user module logs
    itself. The signature comes from a real batch's input run through the model."""
    model = module.net if builtin else module
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    if example is None:
        return ModelPayload(model, None, None, "the data gives no example input (a data module's batches)")
    if not isinstance(example, torch.Tensor):
        return ModelPayload(model, None, None, f"the model's input is a {type(example).__name__}, not a tensor")
    try:
        with torch.no_grad():
            output = model(example.cpu())
    except Exception as exc:  # a user's forward may expect another input: the model is still logged
        return ModelPayload(model, None, None, f"forward() on a batch's input failed ({type(exc).__name__}: {exc})")
    if not isinstance(output, torch.Tensor):
        return ModelPayload(model, None, None, f"forward() returns a {type(output).__name__}, not a tensor")
    return ModelPayload(model, example.cpu().numpy(), output.float().numpy().astype(np.float32))


def batch_input(batch: Any) -> Any:
    """The model's input in a batch: a tensor batch itself, the first item of a tuple or list; None for a dict."""
    if isinstance(batch, torch.Tensor):
        return batch[:2]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0][:2]
    return None
