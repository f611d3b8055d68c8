"""Where a job runs: the hardware decisions, made once from the config and what this machine has (pure), the
detection that feeds them, and the tags that record them."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, replace
from importlib.metadata import version

import torch

from mlproject.config import JobConfig
from mlproject.errors import HardwareError
from mlproject.processes import threads
from mlproject.processes.threads import Sharing, Threads
from mlproject.training.lightning_api import Lightning


@dataclass(frozen=True)
class Runtime:
    """The hardware decisions, made once from the config and what this machine has."""

    accelerator: str  # cpu or gpu
    devices: int
    precision: str
    channels_last: bool
    num_nodes: int = 1
    threads: Threads | None = None  # the CPU threads it computes with, and why (None: torch's default)
    sharing: Sharing | None = field(default=None, compare=False)  # narrows them while others are busy

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.accelerator == "gpu" else "cpu")

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def resolve_runtime(cfg: JobConfig, cuda_available: bool, gpu_bf16: bool, cpu_bf16: bool = False) -> Runtime:
    """Pure: what to run on. 'auto' picks the GPU when there is one; for the built-in networks, bf16-mixed where the
    chosen device computes bf16 natively (a bf16 GPU; a CPU with AVX512-BF16 or AMX); a user module keeps Lightning's
    own default, 32-true, unless precision is given."""
    if cfg.accelerator == "gpu" and not cuda_available:
        raise HardwareError("accelerator=gpu but no CUDA device is visible; use accelerator=cpu or auto")
    accelerator = "gpu" if cfg.accelerator == "gpu" or (cfg.accelerator == "auto" and cuda_available) else "cpu"
    precision = cfg.precision
    if accelerator == "cpu" and precision == "16-mixed":  # Lightning would train in bf16 instead, unasked
        raise HardwareError("precision=16-mixed needs a GPU and none is visible; use auto, bf16-mixed or 32-true")
    if precision == "auto" and cfg.user_module:  # its own Trainer would train it in 32-true: the numbers are its
        precision = "32-true"
    if precision == "auto":
        # bf16-mixed where the device computes it natively: fp32 is slower for LeNet's step (benchmarks/RESULTS.md).
        precision = "bf16-mixed" if (gpu_bf16 if accelerator == "gpu" else cpu_bf16) else "32-true"
    # channels_last: convolutions on a CPU are markedly faster in it (benchmarks/RESULTS.md); an MLP has none.
    channels_last = accelerator == "cpu" and cfg.model != "mlp"
    return Runtime(accelerator, cfg.devices, precision, channels_last, cfg.num_nodes)


def detect_runtime(cfg: JobConfig) -> Runtime:
    cuda = torch.cuda.is_available()
    cpu_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    rt = resolve_runtime(cfg, cuda, cuda and torch.cuda.is_bf16_supported(), cpu_bf16)
    if rt.accelerator == "gpu":  # TF32 for what stays in fp32: Ampere and newer run it at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    share = threads.read_share()
    chosen = threads.decide(share)  # one process: a launcher or a study hands its processes their share
    torch.set_num_threads(chosen.count)
    sharing = Sharing(chosen, share, torch.set_num_threads)
    return replace(rt, threads=chosen, sharing=sharing)


def tags(rt: Runtime, lightning: Lightning) -> dict[str, str]:
    """The run's record of what ran it: versions, the device, the precision and the world size."""
    device = torch.cuda.get_device_name(0) if rt.accelerator == "gpu" else cpu_model()
    return {
        "torch_version": torch.__version__,
        "lightning_version": lightning.pl.__version__,
        "lightning_package": lightning.name,
        "mlflow_version": version("mlflow"),
        "device": device,
        "precision": rt.precision,
        "world_size": str(rt.world_size),
        # read back from torch, not from the rule: what the process computes with as it starts
        "threads": str(torch.get_num_threads()),
        **({"threads_from": rt.threads.why} if rt.threads is not None else {}),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
