"""`lr-finder doctor`'s checks that run inside the job image, with the job's mounts, network and environment."""

from __future__ import annotations

from dataclasses import dataclass

from mlproject.catalog import IDX_FILES
from service.spec import CACHE_TARGET, DATA_TARGET, TRACKING_ENV, LaunchSpec


@dataclass(frozen=True)
class Probe:
    """One `lr-finder doctor` check that runs inside the job image, with the same mounts, network and environment."""

    name: str
    code: str  # Python run by the image's interpreter; exit 0 = ok; prints one line either way
    gpus: bool
    hint: str


_GPU_CODE = """import sys, torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(", ".join(torch.cuda.get_device_name(i) for i in range(n)) or f"torch {torch.__version__} sees no GPU")
sys.exit(0 if n else 1)"""
_TRACKING_CODE = """import sys
from mlflow import MlflowClient
try:
    MlflowClient().search_experiments(max_results=1)
except Exception as exc:  # any failure is the answer; print its first line only
    print(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"); sys.exit(1)
print("answers and accepts the credentials")"""
_DATASET_CODE = """import os, sys
names = {names}
for d in {dirs}:
    if all(os.path.isfile(os.path.join(d, n)) or os.path.isfile(os.path.join(d, n + ".gz")) for n in names):
        print("four IDX files in " + d); sys.exit(0)
print("no Fashion-MNIST IDX files in " + " or ".join({dirs})); sys.exit(1)"""


def doctor_probes(spec: LaunchSpec) -> list[Probe]:
    """GPU (unless --gpus none), tracking server and dataset, each checked where the job will run."""
    dirs = [DATA_TARGET] + [
        f"{CACHE_TARGET}/mlproject/fashion-mnist/FashionMNIST/raw" for m in spec.mounts if m.target == CACHE_TARGET
    ]
    probes = [
        Probe(
            "tracking server",
            _TRACKING_CODE,
            gpus=False,
            hint=f"check {TRACKING_ENV} from inside a container (--network host for a server on 127.0.0.1) and "
            "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN",
        ),
        Probe(
            "dataset",
            _DATASET_CODE.format(names=repr(tuple(IDX_FILES.values())), dirs=repr(dirs)),
            gpus=False,
            hint="pass --data DIR with the four *-ubyte[.gz] files (Debian's dataset-fashion-mnist: "
            "/usr/share/datasets/fashion-mnist), or --cache VOLUME and let a first run download it",
        ),
    ]
    if spec.gpus.wanted:
        gpu = Probe(
            "GPU in a container",
            _GPU_CODE,
            gpus=True,
            hint="install the NVIDIA driver and the NVIDIA container toolkit (nvidia-ctk runtime configure "
            "--runtime=docker, restart dockerd); the image's torch build needs a recent driver (see README)",
        )
        probes.insert(0, gpu)
    return probes
