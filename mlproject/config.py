"""The one typed job configuration: every field, its default and every cross-field check.

Field names are the contract: MLproject parameter = click option = this field = MLflow param key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlproject.catalog import BUILTIN_DATASETS

# Learning-rate-free optimizers, with the LR each is built at unless lr is given (their packages' own defaults): they
# set their step size themselves, so the job runs no range test for them (lr_source=lr-free).
LR_FREE = {"schedulefree": 0.0025, "prodigy": 1.0}
OPTIMIZERS = ("adam", "adamw", "sgd", *LR_FREE)
SCHEDULES = ("auto", "onecycle", "constant", "cosine", "module")
BUILTIN_MODELS = ("lenet", "mlp", "cnn_bn")
IMAGE_FOLDER = "imagefolder"
MODULE_DATA = "module"  # a user module's own dataloaders
LR_METHODS = ("combined", "steepest", "valley", "minimum")
ACCELERATORS = ("auto", "cpu", "gpu")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
DATA_MODES = ("auto", "device", "loader")
MONITOR_MODES = ("min", "max")
PROGRESS = ("auto", "bar", "lines", "off")
STUDY_STAGES = ("all", "plan", "member")  # the compare entry point's --stage

CHECKPOINT_ARTIFACT = "checkpoints/last.ckpt"  # what a failed or preempted run keeps, and resume reads
# The built-in networks' own LR (lr=0): Adam's default, the reference experiment's. A user module's own is its own.
BUILTIN_LR = 1e-3

# Beyond these the job is a mistake, not an experiment: refuse early instead of running for days.
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536
MAX_LR_STEPS = 100_000
MIN_LR_STEPS = 10  # fewer points than the suggestion rules need (lr_range.MIN_POINTS): no sweep could answer
SWEEP_DECADE = 10.0  # lr_max / lr_min at least: the range test reads the slope over a decade of LR or more
MAX_CANDIDATES = 9  # lr_verify: nine half-decade candidates already span four decades

# Trainer arguments with a job parameter of their own (LightningCLI's trainer: key -> the parameter)
TRAINER_FIELDS = {
    "max_epochs": "epochs",
    "accelerator": "accelerator",
    "devices": "devices",
    "num_nodes": "num_nodes",
    "precision": "precision",
    "gradient_clip_val": "gradient_clip_val",
    "accumulate_grad_batches": "accumulate_grad_batches",
    "callbacks": "callbacks",
}
# Trainer arguments that change how the job trains, which it decides itself: a value other than the Trainer's
# default is refused (the strategy follows devices and num_nodes; the fit runs whole epochs; Lightning's own
# checkpoints and loggers are off because the run is the job's).
TRAINER_CONFLICTS = (
    "strategy", "fast_dev_run", "max_steps", "max_time", "min_steps", "min_epochs", "limit_train_batches",
    "overfit_batches", "barebones", "plugins",
)  # fmt: skip
# ... and those that change only what Lightning shows or writes where the job keeps its own: left out, said once.
TRAINER_SHOWN = (
    "logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary", "log_every_n_steps",
    "default_root_dir", "profiler", "enable_autolog_hparams", "model_registry",
)  # fmt: skip

_CLASS_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_METRIC = re.compile(r"[\w./-]+")


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


def _check_verify(setting: str, fraction: float) -> None:
    if not (setting in ("off", "auto") or (setting.isdigit() and 2 <= int(setting) <= MAX_CANDIDATES)):
        raise ConfigError("lr_verify", setting, f"off, auto or a number of candidates from 2 to {MAX_CANDIDATES}")
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ConfigError("verify_fraction", fraction, "a share of the fit's steps, above 0 and at most 1")


def json_object(name: str, text: str) -> dict[str, Any]:
    """A `*_args` parameter: a JSON object, as LightningCLI's init_args; '' reads as {}."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(name, text, f'a JSON object, e.g. {{"hidden": 64}} ({exc.msg})') from exc
    if not isinstance(value, dict):
        raise ConfigError(name, text, 'a JSON object, e.g. {"hidden": 64}')
    return value


def channel_stats(name: str, text: str) -> tuple[float, ...]:
    """image_mean / image_std: '' (computed from the training images) or one number per channel."""
    if not text.strip():
        return ()
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise ConfigError(name, text, "one number per channel, e.g. 0.5 or 0.485,0.456,0.406")
    return values


def is_class_path(name: str) -> bool:
    return bool(_CLASS_PATH.fullmatch(name))


def callback_specs(text: str) -> list[dict[str, Any]]:
    """`callbacks`: '' or JSON, one {"class_path": ..., "init_args": ...} or a list of them, as LightningCLI's."""
    try:
        value = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise ConfigError("callbacks", text, f'a JSON list of {{"class_path": ...}} objects ({exc.msg})') from exc
    specs = value if isinstance(value, list) else [value]
    if not all(isinstance(s, dict) and isinstance(s.get("class_path"), str) for s in specs):
        raise ConfigError("callbacks", text, 'a JSON list of {"class_path": ..., "init_args": {...}} objects')
    return specs


@dataclass(frozen=True)
class JobConfig:
    """Everything one job needs. Defaults reproduce the reference experiment (LeNet, Fashion-MNIST, batch 64)."""

    auto_lr: bool = False
    # The LR when auto_lr is false, and the fallback when the range test gives no answer; 0: the model's own (a user
    # module's, as its configure_optimizers builds it; BUILTIN_LR for the built-in networks).
    lr: float = 0.0
    epochs: int = 4  # with the finder's one-cycle, beats the reference's accuracy (benchmarks/RESULTS.md)
    batch_size: int = 64  # per device
    # The built-in classifier's (adam, adamw, sgd), or an optimizer's class path with optimizer_args: for a user
    # module it then replaces its configure_optimizers, as LightningCLI's optimizer: section does.
    optimizer: str = "adam"
    # auto: onecycle for built-in and torchvision models, the module's own schedule for a user module
    schedule: str = "auto"
    # A built-in network, a torchvision classification model by name, or a LightningModule's class path.
    model: str = "lenet"
    model_args: str = "{}"  # JSON init arguments of the model (LightningCLI's init_args)
    seed: int = 42
    # A built-in dataset, imagefolder (data_dir/train/<class>/...) or a LightningDataModule's class path.
    dataset: str = "fashion-mnist"
    dataset_args: str = "{}"
    data_dir: str = ""  # built-in data: empty searches FASHION_MNIST_DIR / MNIST_DIR, Debian's package, the cache
    config: str = ""  # a LightningCLI YAML file; values given explicitly win over it
    code: str = ""  # a folder put on the import path before class paths are resolved
    lr_attr: str = ""  # the module's LR attribute; empty: lr or learning_rate, as Lightning looks for it
    # LightningCLI's other sections, as a config file sets them (docs/own-model.md):
    optimizer_args: str = "{}"  # init arguments of an optimizer given by class path
    lr_scheduler: str = ""  # an LR scheduler's class path: the schedule a user module trains under
    lr_scheduler_args: str = "{}"
    gradient_clip_val: float = 0.0  # 0: no clipping
    accumulate_grad_batches: int = 1
    callbacks: str = ""  # Lightning callbacks for the fit: a JSON list of {"class_path": ..., "init_args": ...}
    trainer_args: str = "{}"  # further Trainer arguments (LightningCLI's trainer: keys without a field here)
    ckpt_path: str = ""  # a Lightning checkpoint whose weights the module starts from
    monitor: str = "val_loss"  # the figure studies and reports rank by
    monitor_mode: str = "min"
    train_subset: int = 0  # 0: the whole training split
    val_size: int = 5000  # seeded hold-out from the training split, where the data has no validation split
    image_size: int = 64  # image folders: every image is resized to image_size x image_size
    image_mean: str = ""  # image folders: per-channel mean; empty: computed from the training images
    image_std: str = ""
    augment: bool = False  # image data: random crops and horizontal flips while training
    num_workers: int = -1  # DataLoader workers of the loader path; -1: one per core, at most 8
    # The sweep: Smith's range test from lr_min to lr_max, exponentially, in lr_steps optimizer steps.
    lr_min: float = 1e-6
    lr_max: float = 1.0
    lr_steps: int = 100
    lr_method: str = "combined"
    lr_probe: bool = False  # suggest from the loss on a fixed held-out batch after each step (Smith's validation test)
    lr_repeats: int = 1  # range tests with different seeds; the median suggestion is used, the spread logged
    lr_verify: str = "auto"  # off, auto (verify a doubtful suggestion) or a number of candidates to train
    # The share of the fit's steps all verification trials together may take: three candidates train a twelfth of
    # the fit each; a shorter trial ranks the candidates worse (docs/suggestion.md).
    verify_fraction: float = 0.25
    accelerator: str = "auto"
    devices: int = 1  # per machine
    num_nodes: int = 1  # machines, each started by a launcher (torchrun, srun); rank 0 of the first tracks the run
    precision: str = "auto"
    data_mode: str = "auto"  # device: whole split as one tensor on the device; loader: a DataLoader
    compile: bool = False  # torch.compile the network for the fit (not the range test)
    progress: str = "auto"  # auto: Lightning's bar on a terminal, a line per epoch elsewhere (CI logs, docker logs)
    system_metrics: bool = True  # MLflow's CPU, memory and GPU metrics beside the run's own
    run_name: str = ""  # empty: what the run is, e.g. lenet-adam-finder
    register_model: str = ""  # a registered model's name: the logged model becomes its next version
    resume: str = ""  # a run id: continue that run from its last checkpoint, with its configuration

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ConfigError("lr", self.lr, "a finite number > 0, or 0 for the model's own LR")
        _positive_finite("lr_min", self.lr_min)
        _positive_finite("lr_max", self.lr_max)
        if self.lr_max < SWEEP_DECADE * self.lr_min:
            # The range test reads the loss's slope against log10(LR): a narrower sweep is a fit at one LR.
            widest = self.lr_max / SWEEP_DECADE
            raise ConfigError("lr_min", self.lr_min, f"at most lr_max / {SWEEP_DECADE:g} = {widest:g}")
        _int_in("epochs", self.epochs, 1, MAX_EPOCHS)
        _int_in("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _int_in("lr_steps", self.lr_steps, MIN_LR_STEPS, MAX_LR_STEPS)
        _int_in("lr_repeats", self.lr_repeats, 1, 20)
        _check_verify(self.lr_verify, self.verify_fraction)
        _int_in("seed", self.seed, 0, 2**32 - 1)
        _int_in("train_subset", self.train_subset, 0, 10_000_000)
        _int_in("val_size", self.val_size, 1, 10_000_000)
        _int_in("image_size", self.image_size, 8, 4096)
        _int_in("num_workers", self.num_workers, -1, 256)
        _int_in("devices", self.devices, 1, 64)
        _int_in("num_nodes", self.num_nodes, 1, 4096)
        if not (self.optimizer in OPTIMIZERS or is_class_path(self.optimizer)):
            accepted = f"one of {', '.join(OPTIMIZERS)}, or an optimizer's class path (torch.optim.AdamW)"
            raise ConfigError("optimizer", self.optimizer, accepted)
        _choice("schedule", self.schedule, SCHEDULES)
        self._check_lr_free()
        _choice("lr_method", self.lr_method, LR_METHODS)
        _choice("accelerator", self.accelerator, ACCELERATORS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("data_mode", self.data_mode, DATA_MODES)
        _choice("monitor_mode", self.monitor_mode, MONITOR_MODES)
        _choice("progress", self.progress, PROGRESS)
        if len(self.run_name) > 250:
            raise ConfigError("run_name", self.run_name, "at most 250 characters")
        if self.register_model and not _model_name(self.register_model):
            raise ConfigError(
                "register_model", self.register_model, "a model name MLflow takes (letters, digits, . _ - and spaces)"
            )
        self._check_names()
        self._check_sections()
        json_object("model_args", self.model_args)
        json_object("dataset_args", self.dataset_args)
        channel_stats("image_mean", self.image_mean)
        channel_stats("image_std", self.image_std)
        if self.resume and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.resume):
            raise ConfigError("resume", self.resume, "an MLflow run id (letters and digits)")
        if self.accelerator == "cpu" and self.precision == "16-mixed":  # fp16 autocast is a GPU feature
            raise ConfigError("precision", self.precision, "auto, 32-true or bf16-mixed with accelerator=cpu")

    def _check_names(self) -> None:
        if not (self.model in BUILTIN_MODELS or _NAME.fullmatch(self.model) or is_class_path(self.model)):
            raise ConfigError(
                "model",
                self.model,
                f"a built-in network ({', '.join(BUILTIN_MODELS)}), a torchvision classification model "
                "(e.g. resnet18) or a LightningModule's class path (package.module.Class)",
            )
        if not (self.dataset in (*BUILTIN_DATASETS, IMAGE_FOLDER, MODULE_DATA) or is_class_path(self.dataset)):
            raise ConfigError(
                "dataset",
                self.dataset,
                f"{', '.join(BUILTIN_DATASETS)}, {IMAGE_FOLDER}, {MODULE_DATA} (a user module's own dataloaders) or "
                "a LightningDataModule's class path (package.module.Class)",
            )
        if self.lr_attr and not re.fullmatch(r"[A-Za-z_]\w*", self.lr_attr):
            raise ConfigError("lr_attr", self.lr_attr, "an attribute name, e.g. lr")
        if not _METRIC.fullmatch(self.monitor):
            raise ConfigError("monitor", self.monitor, "a metric name the module logs, e.g. val_loss")

    def _check_lr_free(self) -> None:
        """schedulefree and prodigy: the built-in classifier's optimizers, which set their own step size."""
        if self.optimizer not in LR_FREE:
            return
        if self.user_module:
            own = "for a LightningModule of your own (its optimizer is its own)"
            accepted = f"adam, or an optimizer's class path, {own}"
            raise ConfigError("optimizer", self.optimizer, accepted)
        if self.auto_lr:
            accepted = f"false with optimizer={self.optimizer}: it sets its own step size, there is no LR to find"
            raise ConfigError("auto_lr", "true", accepted)
        if self.optimizer == "schedulefree" and self.schedule not in ("auto", "constant"):
            accepted = "auto or constant with optimizer=schedulefree: it schedules itself"
            raise ConfigError("schedule", self.schedule, accepted)

    def _check_sections(self) -> None:
        """LightningCLI's sections as parameters: the optimizer's and scheduler's, the Trainer's, a checkpoint."""
        if json_object("optimizer_args", self.optimizer_args) and not is_class_path(self.optimizer):
            raise ConfigError("optimizer_args", self.optimizer_args, "{} unless optimizer is a class path")
        if self.lr_scheduler and not is_class_path(self.lr_scheduler):
            raise ConfigError("lr_scheduler", self.lr_scheduler, "an LR scheduler's class path, or empty")
        if json_object("lr_scheduler_args", self.lr_scheduler_args) and not self.lr_scheduler:
            raise ConfigError("lr_scheduler_args", self.lr_scheduler_args, "{} unless lr_scheduler is given")
        if not (math.isfinite(self.gradient_clip_val) and self.gradient_clip_val >= 0):
            raise ConfigError("gradient_clip_val", self.gradient_clip_val, "a finite number >= 0 (0: no clipping)")
        _int_in("accumulate_grad_batches", self.accumulate_grad_batches, 1, 1024)
        callback_specs(self.callbacks)
        owned = sorted(set(json_object("trainer_args", self.trainer_args)) & {*TRAINER_FIELDS, *TRAINER_CONFLICTS})
        if owned:
            raise ConfigError("trainer_args", self.trainer_args, f"Trainer arguments the job does not set itself "
                              f"({', '.join(owned)} are its own)")  # fmt: skip

    @property
    def user_module(self) -> bool:
        """The model is a class path: the user's LightningModule, with its own optimizers and loss."""
        return is_class_path(self.model)

    @property
    def resolved_schedule(self) -> str:
        """auto: the module's own for a user module or an lr_scheduler given; for the built-in classifier, onecycle,
        or for an LR-free optimizer its authors' recommendation (Prodigy: cosine to the end; Schedule-Free: none)."""
        if self.schedule != "auto":
            return self.schedule
        if self.optimizer in LR_FREE:
            return "cosine" if self.optimizer == "prodigy" else "constant"
        return "module" if self.user_module or self.lr_scheduler else "onecycle"

    def as_params(self) -> dict[str, str]:
        """The MLflow params: one string per field, in a stable spelling."""
        return {name: _param_string(value) for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_params(cls, params: dict[str, str]) -> JobConfig:
        """The inverse of as_params(), e.g. to rebuild a run's configuration from its config.json."""
        parse: dict[str, Callable[[str], object]] = {
            "bool": lambda v: v == "true",
            "float": float,
            "int": int,
            "str": str,
        }
        fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {k: parse[fields[k]](v) for k, v in params.items() if k in fields}
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> JobConfig:
        return dataclasses.replace(self, **changes)


def _param_string(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(JobConfig))


def parse_lr_free(text: str) -> tuple[str, ...]:
    """The study's `lr_free`: 'schedulefree,prodigy' -> ('schedulefree', 'prodigy'); empty for none."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if any(name not in LR_FREE for name in names) or len(set(names)) < len(names):
        raise ConfigError("lr_free", text, f"a comma-separated list of {', '.join(LR_FREE)}, or empty")
    return names


def parse_lrs(text: str) -> tuple[float, ...]:
    """The study's `lrs`: '1e-5,1e-4' -> (1e-05, 0.0001); a ConfigError naming `lrs` otherwise."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError("lrs", text, "a comma-separated list of learning rates > 0, e.g. 1e-5,1e-4,1e-1")
    return values


def _model_name(name: str) -> bool:
    """MLflow's rule for a registered model's name, checked before training rather than refused after it: no `/`
    or `:`, not blank, not `.` or a name starting `..`."""
    shaped = re.fullmatch(r"[\w.\- ]{1,200}", name) is not None
    return shaped and bool(name.strip()) and name != "." and not name.startswith("..")
