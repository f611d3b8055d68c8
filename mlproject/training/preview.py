"""What `check` says: the job's own checks (task.build: the classes built, the LR target found and tried, the data
read) carried up to the first batch, in one line. What check calls ok, the job accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mlproject.catalog import BUILTIN_DATASETS
from mlproject.config import IMAGE_FOLDER, MODULE_DATA, JobConfig
from mlproject.training import idx, images, sources
from mlproject.training.task import Task, build


def describe(cfg: JobConfig) -> str:
    """'model M on D; LR at L; first batch S', or the one-line error the job would give."""
    job = build(cfg)
    model = f"{cfg.model} (LightningModule)" if job.user_module else cfg.model
    return f"model {model} on {data_of(cfg, job)}; {lr_of(job)}; first batch {shape_of(first_batch(cfg, job))}"


def data_of(cfg: JobConfig, job: Task) -> str:
    if job.dataset in BUILTIN_DATASETS:
        where = idx.find_dir(sources.builtin_source(cfg).candidates)
        return f"{job.dataset} from {where}" if where else f"{job.dataset} (downloaded by torchvision)"
    if job.dataset == IMAGE_FOLDER:
        return f"the image folder {cfg.data_dir}: {images.describe(images.scan(Path(cfg.data_dir)))}"
    if job.dataset == MODULE_DATA:
        return "its own dataloaders"
    return f"{job.dataset} (LightningDataModule)"


def lr_of(job: Task) -> str:
    own = f"{job.own_lr:.6g}" if job.own_lr is not None else "read at the fit's start"
    if job.lr_target is None:
        return f"its own LR ({own}): it has no LR attribute the job could set"
    return f"LR set at {job.lr_target.describe()} (its own: {own})"


def first_batch(cfg: JobConfig, job: Task) -> Any:
    """The first training batch, served as the fit will serve it (on the CPU)."""
    loaders = job.data.loaders(cfg.seed, "cpu")
    if loaders.own:
        return next(iter(job.make_module(False).train_dataloader()))
    if loaders.datamodule is not None:
        loaders.datamodule.prepare_data()
        loaders.datamodule.setup("fit")
        return next(iter(loaders.datamodule.train_dataloader()))
    return next(iter(loaders.train))


def shape_of(batch: Any) -> str:
    """(64, 1, 28, 28) and (64,); the shapes of a tuple's or a dict's tensors."""
    if isinstance(batch, torch.Tensor):
        return str(tuple(batch.shape))
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {shape_of(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return " and ".join(shape_of(item) for item in batch)
    return type(batch).__name__
