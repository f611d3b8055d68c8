"""Who runs a run: the heartbeat rank 0 keeps while it lives, a resume's claim on a run that stopped or lost its
process, and closing a run whose process is gone."""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import uuid
import zipfile
from pathlib import Path

from mlflow.entities import Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlproject.config import CHECKPOINT_ARTIFACT, ConfigError
from mlproject.record.stores import fail_run, refusal

log = logging.getLogger(__name__)

OWNER_TAG, HEARTBEAT_TAG = "lr_finder.owner", "lr_finder.heartbeat"
HEARTBEAT_S = float(os.environ.get("LR_FINDER_HEARTBEAT_S", "15"))  # how often rank 0 says it is alive
STALE_S = 3 * HEARTBEAT_S  # a heartbeat this old means the process is gone (on another host)
# A resume's claim on a run: the param resumed_by.<the stop's end time>.<n> holding the claimant. The store keeps a
# param's first value and refuses another, so of two resumes of one stop exactly one writes it and the other stops.
CLAIM_PARAM = "resumed_by"


def fetch(uri: str, run_id: str) -> Run:
    try:
        return MlflowClient(uri or None).get_run(run_id)
    except MlflowException as exc:
        raise ConfigError("resume", run_id, f"a run id the tracking server knows ({exc.message})") from exc


def claim(uri: str, run_id: str, into: Path) -> Path:
    """Take over a run to resume it: one that stopped (KILLED, FAILED) or lost its process (RUNNING, but silent),
    with a whole checkpoint, which is downloaded `into` the folder and returned; refused for a finished run, a live
    one, a checkpoint that cannot be read, and a run another resume has just taken."""
    run = fetch(uri, run_id)
    status, tags = run.info.status, run.data.tags
    if status == "FINISHED":
        raise ConfigError("resume", run_id, "a run that did not finish (it is FINISHED: start a new one)")
    if status == "RUNNING" and alive(tags, time.time()):
        raise ConfigError("resume", run_id, f"a run whose process is gone ({tags.get(OWNER_TAG, '?')} still runs it)")
    if tags.get("mlflow.project.entryPoint") == "compare" or "lrs" in run.data.params:
        raise ConfigError("resume", run_id, "a training run: a study is rerun, `mlflow run . -e compare` with its lrs")
    client = MlflowClient(uri or None)
    if CHECKPOINT_ARTIFACT.split("/")[1] not in {
        a.path.split("/")[-1] for a in client.list_artifacts(run_id, "checkpoints")
    }:
        raise ConfigError(
            "resume", run_id, "a run with a checkpoint (it stopped before its first epoch ended: rerun it)"
        )
    checkpoint = Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(into)))
    broken = checkpoint_fault(checkpoint)
    if broken:
        raise ConfigError("resume", run_id, f"a run whose checkpoint can be read ({CHECKPOINT_ARTIFACT} {broken})")
    for attempt in itertools.count(1):
        # the stop being resumed (its end time) names the claim: two resumes of one stop write the same param
        key = f"{CLAIM_PARAM}.{run.info.end_time or 0}.{attempt}"
        try:  # a param is written once: the store keeps the first value and refuses any other
            client.log_param(run_id, key, f"{owner()} {time.time():.0f} {uuid.uuid4().hex[:8]}")
        except MlflowException as exc:
            if not refusal(exc):
                raise
            now = client.get_run(run_id)
            holder = now.data.params.get(key, "")
            if claimant_alive(holder, now.data.tags, time.time()):
                who = holder.split()[0]
                raise ConfigError("resume", run_id, f"a run no other resume has taken ({who} took it first)") from None
            continue  # that resume is gone, before it trained: the next claim of this stop
        client.log_batch(run_id, tags=[RunTag(OWNER_TAG, owner()), RunTag(HEARTBEAT_TAG, f"{time.time():.0f}")])
        return checkpoint
    raise AssertionError("unreachable")  # itertools.count never ends


def checkpoint_fault(path: Path) -> str:
    """What is wrong with a checkpoint file ("" when nothing): torch saves a zip archive, and one cut short by a full
    disk or a broken upload has no directory at its end, or a member whose checksum fails."""
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        return f"is cut short or no checkpoint: {size} bytes, not a whole torch archive"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        return f"is damaged: {exc}"
    return f"is damaged: {bad} fails its checksum" if bad else ""


def claimant_alive(holder: str, tags: dict[str, str], now: float) -> bool:
    """Whether the resume that holds a claim ("owner unix-seconds token") still runs: its process looked up where
    it can be; elsewhere its heartbeat once it owns the run, and until then the claim's own age."""
    who, claimed = (holder.split() + ["", ""])[:2]
    here = running_here(who)
    if here is not None:
        return here
    if tags.get(OWNER_TAG) == who:
        return alive(tags, now)
    return claimed.replace(".", "", 1).isdigit() and now - float(claimed) < STALE_S


def owner() -> str:
    """This process as no other can be, even one given its PID later: host:pid:boot.start, the kernel's boot id
    and the process's start time in clock ticks since that boot."""
    return f"{socket.gethostname()}:{os.getpid()}:{incarnation(os.getpid())}"


def incarnation(pid: int) -> str:
    """boot.start: the first 8 characters of the kernel's boot id and the process's start time since the boot
    ("" where /proc cannot tell)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""
    return f"{boot}.{start}"


def running_here(who: str) -> bool | None:
    """Whether the process an owner names runs, where this process can look it up: on this host and this boot, a
    process of that PID started at that moment (a PID given to another process since is not it). None where it
    cannot be looked up (another host, another boot, a PID another process holds now): the heartbeat tells."""
    host, pid, born = (who.split(":") + ["", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return None
    if not born:  # an owner written before the start time was recorded: the PID alone
        return _pid_alive(int(pid))
    if born.split(".")[0] != incarnation(os.getpid()).split(".")[0]:
        return None  # another boot, or the same host name on another machine
    if not _pid_alive(int(pid)):
        return False
    return True if incarnation(int(pid)) == born else None


def alive(tags: dict[str, str], now: float) -> bool:
    """Whether the run's process still runs: looked up directly where it can be, else by its heartbeat's age."""
    here = running_here(tags.get(OWNER_TAG, ""))
    if here is not None:
        return here
    beat = tags.get(HEARTBEAT_TAG, "")
    return bool(beat) and now - float(beat) < STALE_S


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Heartbeat:
    """Rank 0's tags `lr_finder.owner` (owner()) and `lr_finder.heartbeat` (Unix seconds), every HEARTBEAT_S."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        tags = [RunTag(OWNER_TAG, owner()), RunTag(HEARTBEAT_TAG, f"{time.time():.0f}")]
        try:
            self.client.log_batch(self.run_id, tags=tags)
        except Exception as exc:  # an outage: the next beat tries again; training must not stop for it
            log.debug("heartbeat not written: %s", exc)

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat()

    def stop(self) -> None:
        """No more beats; a beat being written finishes first, so that it never races the run's last writes."""
        self._stop.set()
        self._thread.join(timeout=10.0)


def close_run(uri: str, run_id: str, now: float) -> str:
    """End a RUNNING run whose process is gone as FAILED, saying so in error.txt; the status it ended with."""
    run = fetch(uri, run_id)
    tags = run.data.tags
    if run.info.status != "RUNNING":
        raise ConfigError("run_id", run_id, f"a RUNNING run (it is {run.info.status})")
    if alive(tags, now):
        raise ConfigError("run_id", run_id, f"a run whose process is gone ({tags.get(OWNER_TAG, '?')} still runs it)")
    beat = tags.get(HEARTBEAT_TAG)
    since = f"last heard from {now - float(beat):.0f} s ago" if beat else "never heard from"
    fail_run(
        uri,
        run_id,
        f"closed: its process ({tags.get(OWNER_TAG, 'unknown')}) is gone, {since}; "
        f"continue it with resume={run_id} if it has a checkpoint",
    )
    return "FAILED"
