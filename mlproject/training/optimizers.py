"""The fit's LR and schedule on any module: the LR set where its configure_optimizers reads it, the schedule
(its own, constant, or one-cycle) wrapped around the optimizers it builds."""

from __future__ import annotations

import types
from typing import Any

import torch

from mlproject.config import ConfigError
from mlproject.errors import UserCodeError
from mlproject.training.lightning_api import Lightning


def set_lr(lightning: Lightning, module: Any, attr: str, lr: float) -> None:
    """The LR the module's configure_optimizers builds its optimizer at (an attribute, or in its hparams)."""
    lightning.parsing().lightning_setattr(module, attr, lr)


def apply_schedule(module: Any, schedule: str, peak: float, low: float) -> None:
    """module: its own configure_optimizers as it is. constant: its optimizers, their schedulers dropped.
    onecycle: its one optimizer under a one-cycle schedule from `low` (0: peak / 25) to `peak` over the fit."""
    if schedule == "module":
        return
    original = module.configure_optimizers
    owner = type(module).__qualname__

    def configure_optimizers(self: Any) -> Any:
        optimizers = _optimizers(original(), owner)
        if schedule == "constant":
            return optimizers
        if len(optimizers) != 1:
            raise ConfigError(
                "schedule", schedule, f"module or constant for {owner}, which has {len(optimizers)} optimizers"
            )
        div = peak / low if low > 0 else 25.0
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.OneCycleLR(optimizers[0], max_lr=peak, total_steps=total, div_factor=div)
        return {"optimizer": optimizers[0], "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    object.__setattr__(module, "configure_optimizers", types.MethodType(configure_optimizers, module))


def _optimizers(configured: Any, owner: str) -> list[torch.optim.Optimizer]:
    """The optimizers in any of the shapes configure_optimizers may return (Lightning's documented ones)."""
    if isinstance(configured, torch.optim.Optimizer):
        return [configured]
    if isinstance(configured, dict):
        return [configured["optimizer"]]
    if isinstance(configured, (list, tuple)):
        if len(configured) == 2 and isinstance(configured[0], (list, tuple)):  # ([optimizers], [schedulers])
            return list(configured[0])
        return [o if isinstance(o, torch.optim.Optimizer) else o["optimizer"] for o in configured]
    raise UserCodeError(f"{owner}.configure_optimizers returned {type(configured).__name__}, not an optimizer")
