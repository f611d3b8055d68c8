"""The fit's LR and schedule on any module: where its configure_optimizers reads its LR (an LR target), the LR its
optimizers are really built at (read back from them, never assumed), and the schedule (its own, constant, or
one-cycle) wrapped around the optimizers it builds."""

from __future__ import annotations

import functools
import math
import numbers
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlproject.config import ConfigError
from mlproject.errors import UserCodeError
from mlproject.training.lightning_api import Lightning

LR_ATTRS = ("lr", "learning_rate")  # where Lightning's own finder looks
SAME_LR = 1e-9  # relative: an optimizer built from the target holds exactly the value set there


@dataclass(frozen=True)
class LRTarget:
    """Where a module's configure_optimizers takes its LR from: a number (`lr`, `learning_rate` or lr_attr, on the
    module or in its hparams), or an optimizer factory stored as an attribute (an optimizer class, a
    functools.partial of one, LightningCLI's OptimizerCallable), whose `lr` keyword the job sets."""

    lightning: Lightning
    attr: str
    factory: bool = False

    def read(self, module: Any) -> float | None:
        """The number the target holds (None for a factory)."""
        return None if self.factory else float(self.lightning.parsing().lightning_getattr(module, self.attr))

    def describe(self) -> str:
        return f"the `lr` of its optimizer factory `{self.attr}`" if self.factory else f"its attribute `{self.attr}`"

    def set(self, module: Any, lr: float) -> None:
        if not self.factory:
            self.lightning.parsing().lightning_setattr(module, self.attr, lr)
            return
        made = getattr(module, self.attr)
        if isinstance(made, functools.partial):
            made = functools.partial(made.func, *made.args, **{**made.keywords, "lr": lr})
        else:
            made = functools.partial(made, lr=lr)
        object.__setattr__(module, self.attr, made)  # past nn.Module's __setattr__: it is no submodule


def find_target(lightning: Lightning, module: Any, lr_attr: str = "") -> LRTarget | None:
    """The module's LR target: lr_attr when given (a number, or a factory), else `lr` or `learning_rate`, else the one
    attribute holding an optimizer factory; None when it has none."""
    if not lr_attr and getattr(module, CONFIGURED, None) is not None:  # LightningCLI's optimizer: section, wired in
        return LRTarget(lightning, CONFIGURED, factory=True)
    names = (lr_attr,) if lr_attr else LR_ATTRS
    parsing = lightning.parsing()
    for name in names:
        if parsing.lightning_hasattr(module, name):
            value = parsing.lightning_getattr(module, name)
            if _is_factory(value):
                return LRTarget(lightning, name, factory=True)
            if not _is_number(value):
                raise ConfigError("lr_attr", name, f"an attribute holding a number (it holds {_kind(value)})")
            return LRTarget(lightning, name)
    if lr_attr:
        return None
    factories = [name for name, value in vars(module).items() if _is_factory(value)]
    return LRTarget(lightning, factories[0], factory=True) if len(factories) == 1 else None


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_factory(value: object) -> bool:
    func = value.func if isinstance(value, functools.partial) else value
    return isinstance(func, type) and issubclass(func, torch.optim.Optimizer)


def _kind(value: object) -> str:
    return f"a {type(value).__name__}" if value is not None else "None"


def built_lr(optimizers: Sequence[torch.optim.Optimizer]) -> float:
    """The LR the optimizers are built at, as their schedules see it: the largest over every param group of its
    one-cycle peak (max_lr), its schedule's base (initial_lr) or else its lr."""
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    return max(float(group.get("max_lr", group.get("initial_lr", group["lr"]))) for group in groups)


def same_lr(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=SAME_LR)


@dataclass(frozen=True)
class Reach:
    """What configure_optimizers does with the LR before any Trainer exists: the LR it builds at as it comes, and
    whether an LR set at the target reaches the optimizer (None where it cannot be called without a Trainer)."""

    own_lr: float | None
    follows: bool | None
    probe: float | None = None  # the LR set at the target to see whether the optimizer follows
    built_at: float | None = None  # what it built at then
    why_unknown: str = ""


def reach(module: Any, target: LRTarget | None) -> Reach:
    """Call the module's configure_optimizers as it is, then with its target set to another LR, and read both back.
    The module is spent: pass one built for this."""
    owner = type(module).__qualname__
    try:
        own = built_lr(optimizers_of(module.configure_optimizers(), owner))
    except Exception as exc:  # it needs what a Trainer gives (self.trainer, its steps): the fit checks it then
        return Reach(None, None, why_unknown=f"{type(exc).__name__}: {exc}")
    if target is None:
        return Reach(own, None)
    probe = own * 3.7 if own > 0 else 0.0123  # any LR unlike the module's own
    target.set(module, probe)
    built = built_lr(optimizers_of(module.configure_optimizers(), owner))
    return Reach(own, same_lr(built, probe), probe, built)


def unreached(owner: str, target: LRTarget | None, wanted: float, built: float) -> ConfigError:
    """The one line for a module whose optimizer does not take the LR the job sets."""
    where = target.describe() if target is not None else "no LR attribute the job could find"
    return ConfigError(
        "model",
        owner,
        f"a module whose configure_optimizers builds its optimizer at the LR the job sets ({where}, set to "
        f"{wanted:.6g}, but it built at {built:.6g}): take the LR as an init argument `lr` and build the optimizer "
        "at self.lr (or self.hparams.lr), or name the attribute it reads with lr_attr",
    )


def apply_schedule(module: Any, schedule: str, peak: float, low: float) -> None:
    """module: its own configure_optimizers as it is. constant: its optimizers, their schedulers dropped.
    onecycle: its one optimizer under a one-cycle schedule from `low` (0: peak / 25) to `peak` over the fit; cosine:
    from `peak` down to 0 at the fit's last step."""
    if schedule == "module":
        return
    original = module.configure_optimizers
    owner = type(module).__qualname__

    def configure_optimizers(self: Any) -> Any:
        optimizers = optimizers_of(original(), owner)
        if schedule == "constant":
            return optimizers
        if len(optimizers) != 1:
            raise ConfigError(
                "schedule", schedule, f"module or constant for {owner}, which has {len(optimizers)} optimizers"
            )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched: torch.optim.lr_scheduler.LRScheduler
        if schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizers[0], T_max=total)
        else:
            div = peak / low if low > 0 else 25.0
            sched = torch.optim.lr_scheduler.OneCycleLR(optimizers[0], max_lr=peak, total_steps=total, div_factor=div)
        return {"optimizer": optimizers[0], "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    object.__setattr__(module, "configure_optimizers", types.MethodType(configure_optimizers, module))


def optimizers_of(configured: Any, owner: str) -> list[torch.optim.Optimizer]:
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


CONFIGURED = "configured_optimizer"  # where a module given an optimizer by class path holds its factory


def configure_from(module: Any, optimizer: Any | None, scheduler: Any | None, monitor: str) -> None:
    """LightningCLI's optimizer: and lr_scheduler: sections on any module: its configure_optimizers replaced by one
    that builds `optimizer` (a factory taking the parameters; kept as module.configured_optimizer, where the job
    sets its LR) or else keeps the module's own single optimizer, under `scheduler` (a factory taking the
    optimizer). A ReduceLROnPlateau watches its own monitor (Lightning's subclass has one) or the job's."""
    original = module.configure_optimizers
    owner = type(module).__qualname__
    if optimizer is not None:
        object.__setattr__(module, CONFIGURED, optimizer)

    def configure_optimizers(self: Any) -> Any:
        if optimizer is not None:
            built = getattr(self, CONFIGURED)(self.parameters())
        else:
            found = optimizers_of(original(), owner)
            if len(found) != 1:
                raise ConfigError("lr_scheduler", "", f"nothing for {owner}, which has {len(found)} optimizers")
            built = found[0]
        if scheduler is None:
            return built
        made = scheduler(built)
        if isinstance(made, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return {
                "optimizer": built,
                "lr_scheduler": {"scheduler": made, "monitor": getattr(made, "monitor", monitor)},
            }
        return [built], [made]

    object.__setattr__(module, "configure_optimizers", types.MethodType(configure_optimizers, module))
