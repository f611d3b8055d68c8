"""The job's command-line options: one per JobConfig field, with types whose errors read like JobConfig's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from mlproject import config
from mlproject.config import JobConfig


class TrueFalse(click.ParamType):
    """true or false, in any case: the MLproject spelling. Anything else is a typo, not a default."""

    name = "true|false"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word not in ("true", "false"):
            self.fail(config.expected(value, "true or false"), param, ctx)
        return word == "true"


class Number(click.ParamType):
    """An int or a float. What cannot be one reads like every other bad value: '<value>; expected an integer'."""

    def __init__(self, kind: type[int] | type[float]) -> None:
        self.kind = kind
        self.name, self.accepted = ("integer", "an integer") if kind is int else ("number", "a number")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | float:
        if isinstance(value, self.kind) and not isinstance(value, bool):
            return value
        try:
            return self.kind(str(value).strip())
        except ValueError:
            self.fail(config.expected(value, self.accepted), param, ctx)


class OneOf(click.Choice):
    """click.Choice whose error reads like every other bad value: '<value>; expected one of a, b, c'."""

    def get_invalid_choice_message(self, value: Any, ctx: click.Context | None) -> str:
        return config.expected(value, "one of " + ", ".join(map(str, self.choices)))


# One click option per JobConfig field; the option's name is the field's name with dashes.
OPTIONS: list[tuple[str, Any, str]] = [
    ("auto_lr", TrueFalse(), "Run the LR range test and train with its suggestion (true/false)."),
    (
        "lr",
        Number(float),
        "Learning rate when auto_lr is false, and the fallback when the range test finds none; 0: the model's own "
        "(a module's, as its configure_optimizers builds it; 0.001 for the built-in networks).",
    ),
    ("epochs", Number(int), "Training epochs."),
    ("batch_size", Number(int), "Batch size per device (the range test uses it too)."),
    (
        "optimizer",
        click.STRING,
        "The built-in classifier's optimizer: adam, adamw, sgd (momentum 0.9), or the learning-rate-free schedulefree "
        "(Schedule-Free AdamW) and prodigy (no range test for them); or an optimizer's class path with "
        "optimizer_args, which for a user module replaces its configure_optimizers (LightningCLI's optimizer:).",
    ),
    (
        "schedule",
        OneOf(config.SCHEDULES),
        "LR schedule: onecycle peaking at the chosen LR, constant, cosine (from the chosen LR to 0), the module's "
        "own, or auto (onecycle for built-in and torchvision models, cosine for prodigy, none for schedulefree, the "
        "module's own for a user module).",
    ),
    (
        "model",
        click.STRING,
        "lenet, mlp, cnn_bn; a torchvision classifier by name (resnet18, ...); or a LightningModule's class path.",
    ),
    ("model_args", click.STRING, 'The model\'s init arguments as a JSON object, e.g. {"hidden": 64}.'),
    ("seed", Number(int), "Seed for weights, hold-out split and batch order."),
    (
        "dataset",
        click.STRING,
        "fashion-mnist, mnist; imagefolder (data_dir/train/<class>/...); or a LightningDataModule's class path.",
    ),
    ("dataset_args", click.STRING, "The data module's init arguments as a JSON object."),
    ("data_dir", click.STRING, "The image folder; for fashion-mnist/mnist the IDX files' folder, empty: search."),
    ("config", click.STRING, "A LightningCLI YAML config; values given explicitly win over it."),
    ("code", click.STRING, "A folder put on the import path before class paths are resolved."),
    ("lr_attr", click.STRING, "The module's LR attribute; empty: lr or learning_rate, on the module or its hparams."),
    ("optimizer_args", click.STRING, "Init arguments of an optimizer given by class path, as a JSON object."),
    ("lr_scheduler", click.STRING, "An LR scheduler's class path: the schedule a user module trains under."),
    ("lr_scheduler_args", click.STRING, "The LR scheduler's init arguments as a JSON object."),
    ("gradient_clip_val", Number(float), "Clip gradients at this norm (Lightning's gradient_clip_val); 0: none."),
    ("accumulate_grad_batches", Number(int), "Batches whose gradients each optimizer step sums (Lightning's)."),
    ("callbacks", click.STRING, 'Lightning callbacks for the fit: a JSON list of {"class_path": ..., ...} objects.'),
    ("trainer_args", click.STRING, "Further Trainer arguments as a JSON object (LightningCLI's other trainer: keys)."),
    ("ckpt_path", click.STRING, "A Lightning checkpoint whose weights the module starts from."),
    ("monitor", click.STRING, "The figure studies and reports rank by (a value the module logs, e.g. val_loss)."),
    ("monitor_mode", OneOf(config.MONITOR_MODES), "Whether a smaller or a larger monitor value is better."),
    ("train_subset", Number(int), "Use only this many training samples; 0 uses all."),
    ("val_size", Number(int), "Validation samples held out (seeded) where the data has no validation split."),
    ("image_size", Number(int), "Image folders: images are resized to this square size."),
    ("image_mean", click.STRING, "Image folders: per-channel mean, e.g. 0.5 or 0.485,0.456,0.406; empty: computed."),
    ("image_std", click.STRING, "Image folders: per-channel std; empty: computed from the training images."),
    ("augment", TrueFalse(), "Image data: random crops and horizontal flips while training (true/false)."),
    ("num_workers", Number(int), "DataLoader workers for image folders decoded on the fly; -1: one per core, up to 8."),
    ("lr_min", Number(float), "Smallest LR of the range test."),
    ("lr_max", Number(float), "Largest LR of the range test."),
    ("lr_steps", Number(int), "Optimizer steps of the range test, one LR each; it stops early once the loss diverged."),
    ("lr_method", OneOf(config.LR_METHODS), "Rule that turns the range-test curve into an LR."),
    ("lr_probe", TrueFalse(), "Suggest from the loss on a fixed held-out batch after each sweep step (true/false)."),
    ("lr_repeats", Number(int), "Range tests with different seeds; the median suggestion is used, the spread logged."),
    (
        "lr_verify",
        click.STRING,
        "Verify the suggestion by short trial fits of candidate LRs around it: off, auto (when the rules disagree "
        "or the suggestion is uncertain) or the number of candidates.",
    ),
    ("verify_fraction", Number(float), "The share of the fit's steps all verification trials together may take."),
    ("accelerator", OneOf(config.ACCELERATORS), "Where to train: auto picks the GPU when there is one."),
    ("devices", Number(int), "Devices per machine; more than one runs Lightning's DDP, under torchrun (gloo on CPUs)."),
    ("num_nodes", Number(int), "Machines; each runs `torchrun --nnodes N ...` or srun (see docs/deploy.md)."),
    (
        "precision",
        OneOf(config.PRECISIONS),
        "Numeric precision; auto: bf16-mixed where the device computes bf16 natively, else 32-true.",
    ),
    ("data_mode", OneOf(config.DATA_MODES), "device: in-memory data lives on the device; loader: a DataLoader."),
    (
        "compile",
        TrueFalse(),
        "torch.compile the network for the fit (true/false); off by default: slower for LeNet on a CPU.",
    ),
    (
        "progress",
        OneOf(config.PROGRESS),
        "auto: Lightning's progress bar on a terminal, a line per epoch elsewhere; bar; lines; off.",
    ),
    (
        "system_metrics",
        TrueFalse(),
        "Log MLflow's system metrics (CPU, memory; GPU with NVIDIA's library) (true/false).",
    ),
    ("run_name", click.STRING, "The run's name; empty: what it is, e.g. lenet-adam-finder."),
    ("register_model", click.STRING, "Register the logged model under this name (its version tagged with the LR)."),
    ("resume", click.STRING, "A run id: continue that run from its last checkpoint, with its configuration."),
]


def job_options(defaults: JobConfig) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return lambda func: _add_job_options(func, defaults)


def _add_job_options(func: Callable[..., Any], defaults: JobConfig) -> Callable[..., Any]:
    for name, kind, help_text in reversed(OPTIONS):
        flag = "--" + name.replace("_", "-")
        option = click.option(flag, name, type=kind, default=getattr(defaults, name), show_default=True, help=help_text)
        func = option(func)
    func = click.option(
        "--experiment-name",
        default="lr-finder",
        envvar="MLFLOW_EXPERIMENT_NAME",
        show_default=True,
        help="Experiment for runs started outside `mlflow run` (which names its own).",
    )(func)
    return func


def convert(name: str, value: Any) -> Any:
    """A value from a config file, read as the command line reads it: one message for a bad value either way."""
    kind = next(k for n, k, _ in OPTIONS if n == name)
    param = click.Option(["--" + name.replace("_", "-"), name], type=kind)
    return kind.convert(value, param, None) if not isinstance(kind, click.types.StringParamType) else str(value)
