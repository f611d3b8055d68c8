"""Several devices on one machine: the job starts torchrun with one worker per device, passes stop signals on, and
records how the run ended when a worker died before the run could say so itself."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

STATUS_DIR_ENV = "LR_FINDER_STATUS_DIR"  # where each worker leaves its exit code
# torchrun's agent notices a dead worker within this many seconds and stops the others.
MONITOR_S = 0.5
# How long the launcher waits for workers still ending their run after torchrun has gone.
WORKER_GRACE_S = 60.0


@dataclass(frozen=True)
class Outcome:
    """How the workers ended: rank -> exit code, None for a worker that left no code (killed outright)."""

    codes: dict[int, int | None]
    stopped_by: str  # the signal this launcher passed on, or ""

    def lost(self) -> list[int]:
        """The ranks that died on their own: no code left, or killed by a signal nobody sent them. None once a stop
        was passed on: a rank that dies while the job stops (its peers gone from a collective) is part of the stop."""
        if self.stopped_by:
            return []
        return [r for r, c in self.codes.items() if c is None or c > 128]

    def exit_code(self) -> int:
        zero = self.codes.get(0)
        if self.stopped_by:
            return 128 + signal.Signals[self.stopped_by].value
        return zero if zero is not None and not self.lost() else 1


def command(devices: int, argv: list[str]) -> list[str]:
    """torchrun on this machine alone (a free port found by itself), no restarts: a failed rank fails the job."""
    return [
        sys.executable, "-m", "mlproject.processes.launch", "--standalone", f"--nproc-per-node={devices}",
        "--max-restarts=0", f"--monitor-interval={MONITOR_S}", "-m", "mlproject", *argv,
    ]  # fmt: skip


def record_start(rank: int, environ: dict[str, str] | os._Environ = os.environ) -> None:
    """A worker's first act: its process id, so that the launcher can wait for it even when torchrun is gone."""
    folder = environ.get(STATUS_DIR_ENV)
    if folder:
        Path(folder, f"rank{rank}.pid").write_text(str(os.getpid()))


def record_exit(code: int, rank: int, environ: dict[str, str] | os._Environ = os.environ) -> None:
    """A worker's last act: its exit code, for the launcher."""
    folder = environ.get(STATUS_DIR_ENV)
    if folder:
        Path(folder, f"rank{rank}").write_text(str(code))


def run_workers(devices: int, argv: list[str], env: dict[str, str]) -> Outcome:
    """Start torchrun and wait; SIGTERM, SIGINT and SIGHUP are passed on to it (it passes them to the workers)."""
    with tempfile.TemporaryDirectory(prefix="lr-finder-ranks-") as folder:
        # In a session of its own, torchrun gets a stop once, from here: a second one (a signal to the whole
        # process group, then this forward) makes it leave before its workers have ended the run.
        process = subprocess.Popen(command(devices, argv), env={**env, STATUS_DIR_ENV: folder}, start_new_session=True)
        stopped: list[str] = []

        def forward(signum: int, frame: FrameType | None) -> None:
            if not stopped:
                stopped.append(signal.Signals(signum).name)
                process.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            process.wait()
            # torchrun may still leave first (a signal sent to each process of a Slurm step): wait for them.
            _wait_for_workers(Path(folder), devices)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        codes = {rank: _code(Path(folder, f"rank{rank}")) for rank in range(devices)}
    return Outcome(codes, stopped[0] if stopped else "")


def _wait_for_workers(folder: Path, devices: int, timeout_s: float = WORKER_GRACE_S) -> None:
    """Until every worker that recorded its start has exited (or timeout_s has passed)."""
    deadline = time.monotonic() + timeout_s
    pids = [_code(folder / f"rank{rank}.pid") for rank in range(devices)]
    for pid in pids:
        while pid and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie has exited: only its parent's wait is missing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _code(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def lost_reason(outcome: Outcome) -> str:
    """error.txt of a run whose workers did not all end on their own terms."""
    if not outcome.lost():
        how = f"stopped by {outcome.stopped_by}" if outcome.stopped_by else "ended"
        return f"the job {how}, and no rank recorded how the run ended (exit codes by rank: {outcome.codes})"
    parts = []
    for rank in outcome.lost():
        code = outcome.codes[rank]
        how = "was killed before it could report" if code is None else f"exited with code {code}"
        parts.append(f"rank {rank} {how}")
    return "; ".join(parts) + "; the other ranks were stopped (torchrun stops a job whose worker fails)"


if __name__ == "__main__":  # torchrun itself, stopping when the job's launcher dies
    from mlproject.processes import stopping

    stopping.die_with_parent()
    from torch.distributed.run import main

    main()
