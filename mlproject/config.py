"""The one typed job configuration: every field, its default and every cross-field check.

Field names are the contract: MLproject parameter = click option = this field = MLflow param key.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from mlproject.catalog import BUILTIN_DATASETS

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "onecycle")
MODELS = ("lenet", "mlp", "cnn_bn")
LR_METHODS = ("combined", "steepest", "valley", "minimum")
ACCELERATORS = ("auto", "cpu", "gpu")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
DATA_MODES = ("auto", "device", "loader")

CHECKPOINT_ARTIFACT = "checkpoints/last.ckpt"  # what a failed or preempted run keeps, and resume reads

# Beyond these the job is a mistake, not an experiment: refuse early instead of running for days.
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536
MAX_LR_STEPS = 100_000


class ConfigError(ValueError):
    """A parameter value that the job cannot accept; the message names parameter, value and what is accepted."""

    def __init__(self, param: str, value: object, accepted: str) -> None:
        self.param = param
        self.value = value
        self.accepted = accepted
        super().__init__(f"invalid value for {param}: {expected(value, accepted)}")


def expected(value: object, accepted: str) -> str:
    """The tail of every bad-value message, here and in the command line's own types."""
    return f"{value!r}; expected {accepted}"


def _positive_finite(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(name, value, "a finite number > 0")


def _int_in(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(name, value, f"an integer from {low} to {high}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(name, value, "one of " + ", ".join(choices))


@dataclass(frozen=True)
class JobConfig:
    """Everything one job needs. Defaults reproduce the reference experiment (LeNet, Fashion-MNIST, batch 64)."""

    auto_lr: bool = False
    lr: float = 1e-3  # used when auto_lr is false, and as the fallback when the range test gives no answer
    epochs: int = 4  # with the finder's one-cycle, beats the reference's accuracy (benchmarks/RESULTS.md)
    batch_size: int = 64
    optimizer: str = "adam"
    schedule: str = "onecycle"
    model: str = "lenet"
    seed: int = 42
    dataset: str = "fashion-mnist"
    data_dir: str = ""  # empty: search FASHION_MNIST_DIR / MNIST_DIR, Debian's package, the cache, then download
    train_subset: int = 0  # 0: the whole training split
    val_size: int = 5000  # seeded hold-out from the 60k training images
    # The sweep: Smith's range test from lr_min to lr_max, exponentially, in lr_steps optimizer steps.
    lr_min: float = 1e-6
    lr_max: float = 1.0
    lr_steps: int = 100
    lr_method: str = "combined"
    lr_probe: bool = False  # suggest from the loss on a fixed held-out batch after each step (Smith's validation test)
    lr_repeats: int = 1  # range tests with different seeds; the median suggestion is used, the spread logged
    accelerator: str = "auto"
    devices: int = 1
    precision: str = "auto"
    data_mode: str = "auto"  # device: whole split as one tensor on the device; loader: a DataLoader
    compile: bool = False  # torch.compile the network for the fit (not the range test)
    resume: str = ""  # a run id: continue that run from its last checkpoint, with its configuration

    def __post_init__(self) -> None:
        _positive_finite("lr", self.lr)
        _positive_finite("lr_min", self.lr_min)
        _positive_finite("lr_max", self.lr_max)
        if self.lr_min >= self.lr_max:
            raise ConfigError("lr_min", self.lr_min, f"a value below lr_max ({self.lr_max})")
        _int_in("epochs", self.epochs, 1, MAX_EPOCHS)
        _int_in("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _int_in("lr_steps", self.lr_steps, 5, MAX_LR_STEPS)
        _int_in("lr_repeats", self.lr_repeats, 1, 20)
        _int_in("seed", self.seed, 0, 2**32 - 1)
        _int_in("train_subset", self.train_subset, 0, 10_000_000)
        _int_in("val_size", self.val_size, 1, 10_000_000)
        _int_in("devices", self.devices, 1, 64)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("model", self.model, MODELS)
        _choice("dataset", self.dataset, BUILTIN_DATASETS)
        _choice("lr_method", self.lr_method, LR_METHODS)
        _choice("accelerator", self.accelerator, ACCELERATORS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("data_mode", self.data_mode, DATA_MODES)
        if self.resume and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.resume):
            raise ConfigError("resume", self.resume, "an MLflow run id (letters and digits)")
        if self.accelerator == "cpu" and self.precision == "16-mixed":  # fp16 autocast is a GPU feature
            raise ConfigError("precision", self.precision, "auto, 32-true or bf16-mixed with accelerator=cpu")
        if self.devices > 1 and self.data_mode == "device":
            raise ConfigError("data_mode", self.data_mode, "auto or loader when devices > 1")

    def as_params(self) -> dict[str, str]:
        """The MLflow params: one string per field, in a stable spelling."""
        return {name: _param_string(value) for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_params(cls, params: dict[str, str]) -> JobConfig:
        """The inverse of as_params(), e.g. to rebuild a run's configuration from its config.json."""
        parse = {"bool": lambda v: v == "true", "float": float, "int": int, "str": str}
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{k: parse[str(fields[k])](v) for k, v in params.items() if k in fields})  # type: ignore[operator]

    def replace(self, **changes: object) -> JobConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _param_string(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(JobConfig))


def parse_lrs(text: str) -> tuple[float, ...]:
    """The study's `lrs`: '1e-5,1e-4' -> (1e-05, 0.0001); a ConfigError naming `lrs` otherwise."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError("lrs", text, "a comma-separated list of learning rates > 0, e.g. 1e-5,1e-4,1e-1")
    return values
