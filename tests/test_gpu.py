"""The CUDA path: runs only where a GPU is visible (skips with the reason elsewhere)."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from mlproject.config import JobConfig
from mlproject.errors import HardwareError
from mlproject.training.runtime import resolve_runtime
from tests.helpers import mlflow_run, requires_fashion_mnist

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible on this machine")


def test_auto_picks_the_gpu_and_bf16_where_supported():
    # Pure decision logic, checked on every machine; the hardware itself is stood in for by the flags.
    rt = resolve_runtime(JobConfig(), cuda_available=True, gpu_bf16=True)
    assert (rt.accelerator, rt.precision, rt.channels_last) == ("gpu", "bf16-mixed", False)
    rt = resolve_runtime(JobConfig(), cuda_available=True, gpu_bf16=False, cpu_bf16=True)
    assert rt.precision == "32-true"
    rt = resolve_runtime(JobConfig(devices=2), cuda_available=True, gpu_bf16=True)
    assert (rt.devices, rt.world_size) == (2, 2)
    rt = resolve_runtime(JobConfig(), cuda_available=False, gpu_bf16=False, cpu_bf16=True)
    assert (rt.accelerator, rt.precision, rt.channels_last) == ("cpu", "bf16-mixed", True)
    rt = resolve_runtime(JobConfig(precision="32-true"), False, False, cpu_bf16=True)
    assert rt.precision == "32-true"
    with pytest.raises(HardwareError, match="precision=16-mixed needs a GPU"):  # not a silent switch to bf16
        resolve_runtime(JobConfig(precision="16-mixed"), False, False, cpu_bf16=True)


@pytest.mark.gpu
@gpu
@requires_fashion_mnist
def test_one_epoch_on_the_gpu_in_bf16(tmp_path):
    result = mlflow_run(tmp_path, "gpu", "auto_lr=true", "epochs=1", "accelerator=gpu")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("gpu").experiment_id])
    assert run.data.tags["precision"] == "bf16-mixed"
    assert run.data.tags["device"] == torch.cuda.get_device_name(0)
    assert run.data.metrics["test_acc"] >= 0.85
