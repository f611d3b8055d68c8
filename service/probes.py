"""`lr-finder doctor`'s checks that run inside the job image, with the job's mounts, network and environment."""

from __future__ import annotations

from dataclasses import dataclass

from service.spec import DATA_TARGET, TRACKING_ENV, LaunchSpec


@dataclass(frozen=True)
class Probe:
    """One `lr-finder doctor` check that runs inside the job image, with the same mounts, network and environment."""

    name: str
    command: tuple[str, ...]  # the image's python's arguments; exit 0 = ok; prints one line either way
    gpus: bool
    hint: str


_GPU_CODE = """import sys, torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(", ".join(torch.cuda.get_device_name(i) for i in range(n)) or f"torch {torch.__version__} sees no GPU")
sys.exit(0 if n else 1)"""
_THREADS_CODE = """from mlproject.processes import threads
chosen = threads.decide(threads.read_share())
print(f"{chosen.count} ({chosen.why})")"""
_TRACKING_CODE = """import sys
from mlflow import MlflowClient
try:
    MlflowClient().search_experiments(max_results=1)
except Exception as exc:  # any failure is the answer; print its first line only
    print(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"); sys.exit(1)
print("answers and accepts the credentials")"""


def doctor_probes(spec: LaunchSpec, check: tuple[str, ...]) -> list[Probe]:
    """GPU (unless --gpus none), tracking server, and the job's own check of its data and code (check: python's
    arguments for it), each run where the job will run."""
    probes = [
        Probe(
            "tracking server",
            ("-c", _TRACKING_CODE),
            gpus=False,
            hint=f"check {TRACKING_ENV} from inside a container (--network host for a server on 127.0.0.1) and "
            "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN",
        ),
        Probe(
            "threads",
            ("-c", _THREADS_CODE),
            gpus=False,
            hint="pass --cpus N for the CPUs the job may use, or --env OMP_NUM_THREADS with it set here",
        ),
        Probe(
            "data and code",
            check,
            gpus=False,
            hint=f"pass --data DIR with what the job reads at {DATA_TARGET} (the IDX files, or an image folder with "
            f"-P dataset=imagefolder), --code DIR with the classes a class path names (-P model=pkg.Module), or "
            "correct the parameter the line names (-P key=value)",
        ),
    ]
    if spec.gpus.wanted:
        gpu = Probe(
            "GPU in a container",
            ("-c", _GPU_CODE),
            gpus=True,
            hint="install the NVIDIA driver and the NVIDIA container toolkit (nvidia-ctk runtime configure "
            "--runtime=docker, restart dockerd); the image's torch build needs a recent driver (see README)",
        )
        probes.insert(0, gpu)
    return probes


def answer(output: str, status: int) -> str:
    """A probe's one line: the job check's own `ok:` or `error:` line (log lines may follow it), else the last."""
    lines = output.strip().splitlines()
    said = [line for line in lines if line.startswith(("ok: ", "error: "))]
    return (said or lines or [f"exit code {status}, no output"])[-1]
