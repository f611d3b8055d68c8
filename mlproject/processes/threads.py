"""How many threads a job's process computes with: the CPU share it really has (its affinity mask, and the CPU quota
of its cgroup, which a container's --cpus sets), divided among the job's processes on this machine, and narrowed for
as long as other processes keep those CPUs busy. An OMP_NUM_THREADS the user set wins, and is not narrowed.

torch's default is one thread per CPU of the machine, spinning while it waits: beside one other busy process, a
step's parallel regions each wait for a thread the scheduler has parked, and an epoch takes 4x its quiet time
(benchmarks/RESULTS.md, "Sharing the CPUs"). Importable without torch: `lr-finder doctor` reads the share with it."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GIVEN_ENV = "OMP_NUM_THREADS"
# Set beside OMP_NUM_THREADS by the job for the processes it starts (DDP ranks, a study's members): the rule's own
# answer, which those processes may narrow further; an OMP_NUM_THREADS without it is the user's, kept as given.
FROM_ENV = "LR_FINDER_THREADS_FROM"
CHECK_S = 2.0  # seconds of training between two looks at how busy the CPUs are: each look reads /proc/stat
# Other processes' load, in CPUs, at which a thread is given up: one busy thread beside two of the job's gets two
# thirds of a CPU from a fair scheduler. Below it (a shell, a tracking server answering) the threads stay.
GIVE_UP_AT = 0.5


@dataclass(frozen=True)
class CpuShare:
    """The CPUs a process may use: those of its affinity mask, capped by its cgroup's quota (in CPUs)."""

    affinity: int
    quota: float | None = None
    quota_from: str = ""

    @property
    def cpus(self) -> float:
        return min(float(self.affinity), self.quota) if self.quota is not None else float(self.affinity)

    def describe(self) -> str:
        mask = f"{self.affinity} CPU{'s' if self.affinity != 1 else ''} in its affinity mask"
        return mask + (f", a quota of {self.quota:g} ({self.quota_from})" if self.quota is not None else "")


@dataclass(frozen=True)
class Threads:
    count: int
    why: str
    given: bool = False  # the user's OMP_NUM_THREADS: kept as it is, never narrowed


def decide(share: CpuShare, processes: int = 1, environ: Mapping[str, str] = os.environ) -> Threads:
    """Pure: the share's CPUs divided among `processes`, rounded down, one at least; OMP_NUM_THREADS where set (the
    job's own setting for a process it started carries the reason beside it)."""
    given = environ.get(GIVEN_ENV, "").strip()
    if given.isdigit() and int(given) > 0:
        started = environ.get(FROM_ENV, "")
        return Threads(int(given), started or f"{GIVEN_ENV}={given}, given", given=not started)
    count = max(1, math.floor(share.cpus / max(1, processes)))
    return Threads(count, f"{share.describe()}, {processes} process{'es' if processes > 1 else ''} of the job")


def for_children(processes: int, who: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment for `processes` processes the job starts to share this one's CPUs (DDP ranks, a study's
    members); nothing where the user set OMP_NUM_THREADS, which they inherit as it is."""
    if decide(CpuShare(1), 1, environ).given:
        return {}
    threads = decide(read_share(), processes, {})
    return {GIVEN_ENV: str(threads.count), FROM_ENV: f"{threads.why} ({who})"}


# --- reading the share ------------------------------------------------------------------------------------------


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2's cpu.max, "QUOTA PERIOD" in microseconds ("max" for none), as CPUs."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    quota, period = float(parts[0]), float(parts[1])
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota: str, period: str) -> float | None:
    """cgroup v1's cpu.cfs_quota_us and cpu.cfs_period_us (a quota of -1: none), as CPUs."""
    q, p = float(quota.strip()), float(period.strip())
    return q / p if q > 0 and p > 0 else None


def read_share(proc: Path = Path("/proc/self"), cgroups: Path = Path("/sys/fs/cgroup")) -> CpuShare:
    """This process's affinity and the tightest CPU quota of its cgroup and the cgroups above it (v2, or v1's cpu
    controller); no quota where none can be read."""
    affinity = len(os.sched_getaffinity(0))
    try:
        lines = (proc / "cgroup").read_text().splitlines()
    except OSError:
        return CpuShare(affinity)
    quotas: list[tuple[float, str]] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy
            for folder in _up_from(cgroups, path):
                quotas += _read(folder / "cpu.max", lambda f: parse_cpu_max(f.read_text()))
        elif "cpu" in controllers.split(","):
            root = next((cgroups / c for c in (controllers, "cpu,cpuacct", "cpu") if (cgroups / c).is_dir()), None)
            for folder in _up_from(root, path) if root is not None else []:
                quotas += _read(
                    folder / "cpu.cfs_quota_us",
                    lambda f: parse_cfs(f.read_text(), (f.parent / "cpu.cfs_period_us").read_text()),
                )
    if not quotas:
        return CpuShare(affinity)
    quota, where = min(quotas)
    return CpuShare(affinity, quota, where)


def _up_from(root: Path, path: str) -> list[Path]:
    """root/path and each folder above it, up to root (a container sees its own cgroup as root)."""
    folder = root / path.strip("/")
    found = [folder]
    while folder != root and root in folder.parents:
        folder = folder.parent
        found.append(folder)
    return found


def _read(path: Path, parse: Callable[[Path], float | None]) -> list[tuple[float, str]]:
    try:
        value = parse(path)
    except (OSError, ValueError):
        return []
    return [(value, str(path))] if value is not None else []


# --- sharing as the job runs ------------------------------------------------------------------------------------


class Sharing:
    """Narrows the threads while other processes keep this process's CPUs busy, and widens them back, up to the
    rule's count, once they stop: every CHECK_S seconds of training it compares the busy time of those CPUs
    (/proc/stat; under a quota, the quota's cgroup's usage) with this process's own CPU time. `tick` is called at
    every step; between two looks it costs one clock read."""

    def __init__(
        self,
        threads: Threads,
        share: CpuShare,
        set_threads: Callable[[int], None],
        stat: Path = Path("/proc/stat"),
        clock: Callable[[], float] = time.monotonic,
        cpu_ids: Iterable[int] | None = None,  # the CPUs counted in stat: this process's mask unless given
    ) -> None:
        self.ceiling, self.count, self.cpus = threads.count, threads.count, share.cpus
        self.set_threads, self.clock = set_threads, clock
        self.fixed = threads.given or threads.count == 1
        self.busy = _busy_source(share, stat, sorted(cpu_ids if cpu_ids is not None else os.sched_getaffinity(0)))
        self.last = self._sample()

    def tick(self) -> None:
        if self.fixed or self.clock() - self.last[0] < CHECK_S:
            return
        sample = self._sample()
        others = busy_elsewhere(self.last, sample)
        self.last = sample
        wanted = wanted_threads(self.ceiling, self.cpus, others)
        if wanted != self.count:
            why = f"other processes keep {others:.1f} of its {self.cpus:g} CPUs busy"
            log.info("threads: %d, not %d: %s", wanted, self.count, why)
            self.count = wanted
            self.set_threads(wanted)

    def _sample(self) -> tuple[float, float, float]:
        """(wall seconds, busy CPU seconds of this process's CPUs, this process's CPU seconds)."""
        times = os.times()
        return self.clock(), self.busy(), times.user + times.system


def _busy_source(share: CpuShare, stat: Path, cpus: list[int]) -> Callable[[], float]:
    """Where the CPUs this process competes for are counted: under a quota tighter than the affinity mask, the
    quota's cgroup (cgroup v2's cpu.stat, next to the cpu.max it came from), which its siblings share; else the
    CPUs of the affinity mask in /proc/stat."""
    usage = Path(share.quota_from).with_name("cpu.stat") if share.quota is not None else None
    if usage is not None and share.quota is not None and share.quota < share.affinity:
        if share.quota_from.endswith("cpu.max") and usage.is_file():
            return lambda: cgroup_usage(usage)
        return lambda: 0.0  # v1: the quota's usage sits in another hierarchy; the rule's count stays
    return lambda: cpu_busy(stat, cpus)


def cgroup_usage(stat: Path) -> float:
    """Seconds of CPU a cgroup's processes used (cgroup v2's cpu.stat usage_usec)."""
    for line in stat.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) / 1e6
    return 0.0


def cpu_busy(stat: Path, cpus: list[int]) -> float:
    """Seconds the given CPUs spent busy since boot, from /proc/stat: user, nice, system, irq, softirq and steal
    (idle and iowait are not; guest time is already in user's)."""
    wanted = {f"cpu{c}" for c in cpus}
    total = 0
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if name in wanted:
            ticks = [int(f) for f in fields[:8]]
            total += sum(ticks) - ticks[3] - ticks[4]
    return total / os.sysconf("SC_CLK_TCK")


def busy_elsewhere(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """CPUs other processes kept busy between two samples: the CPUs' busy time less this process's own."""
    wall = after[0] - before[0]
    if wall <= 0:
        return 0.0
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / wall)


def wanted_threads(ceiling: int, cpus: float, others: float) -> int:
    """Pure: the rule's count, less a thread for each CPU others keep busy (from GIVE_UP_AT of one), one at least."""
    taken = math.floor(others + (1 - GIVE_UP_AT)) if others >= GIVE_UP_AT else 0
    return max(1, min(ceiling, math.floor(cpus) - taken))
