"""Several devices on one machine: the job starts torchrun with one worker per device, passes stop signals on, and
records how the run ended when a worker died before the run could say so itself."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from mlproject.config import JobConfig
from mlproject.tracking_env import configure_client, redact

log = logging.getLogger(__name__)

STATUS_DIR_ENV = "LR_FINDER_STATUS_DIR"  # where each worker leaves its exit code
# torchrun's agent notices a dead worker within this many seconds and stops the others.
MONITOR_S = 0.5


@dataclass(frozen=True)
class Outcome:
    """How the workers ended: rank -> exit code, None for a worker that left no code (killed outright)."""

    codes: dict[int, int | None]
    stopped_by: str  # the signal this launcher passed on, or ""

    def lost(self) -> list[int]:
        """The ranks that died on their own: no code left, or killed by a signal nobody sent them."""
        return [r for r, c in self.codes.items() if c is None or (c > 128 and not self.stopped_by)]

    def exit_code(self) -> int:
        zero = self.codes.get(0)
        if self.stopped_by:
            return 128 + signal.Signals[self.stopped_by].value
        return zero if zero is not None and not self.lost() else 1


def command(devices: int, argv: list[str]) -> list[str]:
    """torchrun on this machine alone (a free port found by itself), no restarts: a failed rank fails the job."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
        "--max-restarts=0", f"--monitor-interval={MONITOR_S}", "-m", "mlproject", *argv,
    ]  # fmt: skip


def record_exit(code: int, rank: int, environ: dict[str, str] | os._Environ = os.environ) -> None:
    """A worker's last act: its exit code, for the launcher."""
    folder = environ.get(STATUS_DIR_ENV)
    if folder:
        Path(folder, f"rank{rank}").write_text(str(code))


def run_workers(devices: int, argv: list[str], env: dict[str, str]) -> Outcome:
    """Start torchrun and wait; SIGTERM, SIGINT and SIGHUP are passed on to it (it passes them to the workers)."""
    with tempfile.TemporaryDirectory(prefix="lr-finder-ranks-") as folder:
        process = subprocess.Popen(command(devices, argv), env={**env, STATUS_DIR_ENV: folder})
        stopped: list[str] = []

        def forward(signum: int, frame: FrameType | None) -> None:
            if not stopped:
                stopped.append(signal.Signals(signum).name)
                process.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        codes = {rank: _code(Path(folder, f"rank{rank}")) for rank in range(devices)}
    return Outcome(codes, stopped[0] if stopped else "")


def _code(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def lost_reason(outcome: Outcome) -> str:
    """error.txt of a run whose workers did not all end on their own terms."""
    parts = []
    for rank in outcome.lost():
        code = outcome.codes[rank]
        how = "was killed before it could report" if code is None else f"exited with code {code}"
        parts.append(f"rank {rank} {how}")
    return "; ".join(parts) + "; the other ranks were stopped (torchrun stops a job whose worker fails)"


def supervise(cfg: JobConfig, experiment_name: str, argv: list[str]) -> int:
    """The job as torchrun's launcher: its names checked, its run created (or `mlflow run`'s taken) and handed to the
    workers, and a run that lost a worker recorded FAILED; returns the job's exit code."""
    from mlproject import task
    from mlproject.stores import create_run, fail_run, probe, run_status

    task.check(cfg)  # a mistake in the names fails before any process starts
    configure_client()
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    probe(uri)
    run_id = cfg.resume or os.environ.get("MLFLOW_RUN_ID") or create_run(uri, experiment_name)
    log.info("run %s on %s: %d processes (torchrun)", run_id, redact(uri) or "the local store", cfg.devices)
    # The cores shared out among the workers (torchrun would give each one thread, and say so at length).
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // cfg.devices))}
    outcome = run_workers(cfg.devices, argv, {**threads, **os.environ, "MLFLOW_RUN_ID": run_id})
    if outcome.lost() or run_status(uri, run_id) == "RUNNING":
        fail_run(uri, run_id, lost_reason(outcome))
    return outcome.exit_code()
