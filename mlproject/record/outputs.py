"""What a run holds besides params and metrics: files, the datasets it read, the model and its registered version."""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.numpy_dataset import from_numpy
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from mlproject.errors import TrackingError
from mlproject.record.client import RunClient
from mlproject.record.stores import lost_insert_race

if TYPE_CHECKING:
    from mlproject.record.payload import ModelPayload

log = logging.getLogger(__name__)

INSERT_RACE_TRIES = 3


@dataclass(frozen=True)
class DataInput:
    """A dataset the run records as an input: numpy arrays (built-in) or a folder's description."""

    name: str
    context: str  # training, validation, test
    source: str
    arrays: tuple[Any, Any] | None = None  # images, labels
    rows: int = 0


def log_files(run: RunClient, files: Mapping[str, bytes | str], artifact_path: str | None = None) -> None:
    """Write named contents to a temporary folder and log them together."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        run.patiently(lambda: run.client.log_artifacts(run.run_id, tmp, artifact_path), "logging artifacts")


def as_json(payload: object) -> str:
    return json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"


def log_dataset(run: RunClient, item: DataInput) -> None:
    """A run input with its context tag, as mlflow.log_input writes it: arrays with their digest, or a folder's
    source alone."""
    dataset = _dataset(item)
    if dataset is None:
        return
    link = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, item.context)])
    for attempt in range(INSERT_RACE_TRIES):
        try:
            run.patiently(lambda: run.client.log_inputs(run.run_id, datasets=[link]), "logging the dataset")
            return
        except MlflowException as exc:
            # Jobs logging the same dataset at once race on the server's insert (a unique violation on
            # PostgreSQL); the loser's retry finds the winner's row and links to it.
            if attempt == INSERT_RACE_TRIES - 1 or not lost_insert_race(exc):
                raise
            time.sleep(0.5)


def _dataset(item: DataInput) -> Dataset | None:
    """MLflow's dataset for an input: its arrays with their digest, or a folder's source alone; None when the source
    is nothing MLflow can point at (a data module's own notion of one)."""
    with warnings.catch_warnings():  # a local path matches two equivalent source types; either is right
        warnings.simplefilter("ignore", UserWarning)
        if item.arrays is not None:
            images, labels = item.arrays
            return from_numpy(images, targets=labels, source=item.source, name=item.name)
        try:
            source = resolve_dataset_source(item.source)
        except MlflowException:
            log.info("dataset %s: %s is no source MLflow knows; not logged as a run input", item.name, item.source)
            return None
        return MetaDataset(source, name=item.name)  # type: ignore[abstract]  # MLflow's class: its stubs say abstract


def log_model(run: RunClient, payload: ModelPayload, code: str = "") -> str:
    """torch.export's program where the model exports (it loads where this package and the user's code are
    absent); a pickle otherwise, with the user's code folder alongside. Returns the model's URI."""
    import mlflow.pytorch  # imports torch: kept off the tracker's import path (`close`, a failed start)
    from mlflow.models import infer_signature

    if payload.why_no_signature:
        log.warning("logging the model without a signature: %s", payload.why_no_signature)
    signature = infer_signature(payload.example, payload.output) if payload.example is not None else None
    requirements = [f"torch=={torch_version()}"]

    def write(serialization: str) -> str:
        extra = {"code_paths": [code]} if code and serialization == "pickle" else {}
        info = mlflow.pytorch.log_model(
            payload.model,
            name="model",
            signature=signature,
            input_example=payload.example,
            pip_requirements=requirements,
            serialization_format=serialization,
            **extra,
        )
        return str(info.model_uri)

    if payload.example is None:  # torch.export traces the model on an example input
        return run.patiently(lambda: write("pickle"), "logging the model")
    try:
        with warnings.catch_warnings():  # torch.export's advice on how the user's module stores tensors
            warnings.simplefilter("ignore", UserWarning)
            return run.patiently(lambda: write("pt2"), "logging the model")
    except (MlflowException, TrackingError):
        raise
    except Exception as exc:  # torch.export cannot trace every user forward(): keep the model as a pickle
        log.warning("torch.export failed (%s: %s); logging the model as a pickle", type(exc).__name__, exc)
        return run.patiently(lambda: write("pickle"), "logging the model")


def register(run: RunClient, name: str, model_uri: str, tags: Mapping[str, str]) -> str:
    """The logged model as the next version of the registered model `name`, tagged; returns the version."""
    version = run.patiently(lambda: mlflow.register_model(model_uri, name), "registering the model").version
    for key, value in tags.items():

        def tag(key: str = key, value: str = value) -> None:
            run.client.set_model_version_tag(name, version, key, value)

        run.patiently(tag, "tagging the model version")
    return str(version)


def torch_version() -> str:
    import torch  # the model's pin; the tracker itself needs no torch

    return torch.__version__.split("+")[0]
