"""How many threads the job computes with: the rule on synthetic affinity masks, cgroup quotas (v2's cpu.max, v1's
cfs files, in folders laid out as the kernel lays them) and OMP_NUM_THREADS; and the narrowing while other processes
keep the CPUs busy, on a /proc/stat written here. The container with a real --cpus quota is in test_docker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlproject.processes import threads
from mlproject.processes.threads import CpuShare, Threads


@pytest.mark.parametrize(
    ("share", "processes", "count"),
    [
        (CpuShare(64), 1, 64),
        (CpuShare(64, 4.0, "cpu.max"), 1, 4),  # a container given 4 CPUs of a 64-core runner
        (CpuShare(64, 4.0, "cpu.max"), 2, 2),  # ... shared by two DDP ranks
        (CpuShare(2, 1.5, "cpu.max"), 1, 1),  # a second thread would be throttled half the time
        (CpuShare(2, 0.5, "cpu.max"), 1, 1),  # one at least
        (CpuShare(2), 3, 1),
        (CpuShare(8), 3, 2),
    ],
)
def test_threads_are_the_shares_cpus_divided_among_the_jobs_processes(share, processes, count):
    assert threads.decide(share, processes, {}).count == count


def test_a_users_omp_num_threads_wins_and_is_never_narrowed():
    chosen = threads.decide(CpuShare(2, 1.0, "cpu.max"), 1, {"OMP_NUM_THREADS": "6"})
    assert chosen == Threads(6, "OMP_NUM_THREADS=6, given", given=True)
    assert threads.decide(CpuShare(2), 1, {"OMP_NUM_THREADS": "none"}).count == 2, "not a count: the rule decides"


def test_the_processes_the_job_starts_get_their_share_and_say_why():
    env = threads.for_children(2, "DDP ranks", {})
    share = threads.read_share()
    assert env["OMP_NUM_THREADS"] == str(max(1, int(share.cpus // 2)))
    child = threads.decide(CpuShare(1), 1, env)
    assert not child.given, "the job's own setting: the child may narrow it further"
    assert child.why.endswith(", 2 processes of the job (DDP ranks)")
    assert threads.for_children(2, "DDP ranks", {"OMP_NUM_THREADS": "3"}) == {}, "the user's, inherited as it is"


def cgroup_v2(tmp_path: Path, path: str, limits: dict[str, str]) -> tuple[Path, Path]:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    (proc / "cgroup").write_text(f"0::{path}\n")
    for folder, cpu_max in limits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(cpu_max + "\n")
    (root / path.strip("/")).mkdir(parents=True, exist_ok=True)
    return proc, root


def test_a_v2_quota_is_the_tightest_of_the_cgroup_and_those_above_it(tmp_path):
    proc, root = cgroup_v2(tmp_path, "/kubepods/pod1/job", {"kubepods": "max 100000", "kubepods/pod1": "250000 100000"})
    share = threads.read_share(proc, root)
    assert share.quota == 2.5 and share.quota_from == str(root / "kubepods/pod1/cpu.max")
    assert share.affinity == len(os.sched_getaffinity(0))
    assert threads.decide(share, 1, {}).count == min(2, share.affinity)


def test_no_quota_leaves_the_affinity_mask(tmp_path):
    proc, root = cgroup_v2(tmp_path, "/", {"": "max 100000"})
    assert threads.read_share(proc, root) == CpuShare(len(os.sched_getaffinity(0)))
    assert threads.read_share(tmp_path / "no-proc", root).quota is None, "no /proc: the mask alone"


def test_a_v1_quota_is_read_from_the_cpu_controllers_cfs_files(tmp_path):
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    (proc / "cgroup").write_text("4:memory:/docker/c1\n3:cpu,cpuacct:/docker/c1\n0::/docker/c1\n")
    folder = root / "cpu,cpuacct"  # a container sees its own cgroup at the controller's root
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("150000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    share = threads.read_share(proc, root)
    assert (share.quota, share.quota_from) == (1.5, str(folder / "cpu.cfs_quota_us"))
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.read_share(proc, root).quota is None


@pytest.mark.parametrize(
    ("text", "cpus"), [("200000 100000", 2.0), ("50000 100000", 0.5), ("max 100000", None), ("garbage", None)]
)
def test_cpu_max_reads_as_cpus(text, cpus):
    assert threads.parse_cpu_max(text) == cpus


@pytest.mark.parametrize(
    ("others", "wanted"),
    [(0.0, 2), (0.3, 2), (0.67, 1), (1.0, 1), (3.0, 1)],  # 0.67: one busy thread beside the job's two
)
def test_a_thread_is_given_up_for_each_cpu_others_keep_busy(others, wanted):
    assert threads.wanted_threads(2, 2.0, others) == wanted


def test_threads_never_exceed_the_rules_count_whatever_is_idle():
    assert threads.wanted_threads(1, 8.0, 0.0) == 1
    assert threads.wanted_threads(6, 8.0, 2.2) == 6


class Machine:
    """A /proc/stat of four CPUs, and a clock, both moved by hand."""

    cpus = (0, 1, 2, 3)

    def __init__(self, folder: Path) -> None:
        self.stat, self.now, self.busy = folder / "stat", 1000.0, 0
        self.write()

    def write(self) -> None:
        per_cpu = self.busy // len(self.cpus)
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]  # the total line: not read
        lines += [f"cpu{c} {per_cpu} 0 0 999999 0 0 0 0 {per_cpu} 0" for c in self.cpus]  # guest: in user's already
        self.stat.write_text("\n".join(lines) + "\n")

    def run(self, seconds: float, busy_cpus: float) -> None:
        self.now += seconds
        self.busy += int(seconds * busy_cpus * os.sysconf("SC_CLK_TCK"))
        self.write()


def test_sharing_narrows_while_others_are_busy_and_widens_back_after(tmp_path):
    machine, applied = Machine(tmp_path), []
    share = CpuShare(4)
    start = threads.decide(share, 1, {})
    sharing = threads.Sharing(start, share, applied.append, machine.stat, lambda: machine.now, machine.cpus)
    machine.run(threads.CHECK_S / 2, 1.0)  # one CPU kept busy, not by this process
    sharing.tick()
    assert applied == [], "no look before CHECK_S seconds"
    machine.run(threads.CHECK_S / 2, 1.0)
    sharing.tick()
    assert applied == [3]
    machine.run(threads.CHECK_S, 4.0)
    sharing.tick()
    assert applied == [3, 1], "one at least"
    machine.run(threads.CHECK_S, 0.0)
    sharing.tick()
    assert applied == [3, 1, 4], "back to the rule's count once the others stop"


def test_sharing_leaves_a_users_count_alone(tmp_path):
    machine, applied = Machine(tmp_path), []
    given = Threads(4, "OMP_NUM_THREADS=4, given", given=True)
    sharing = threads.Sharing(given, CpuShare(4), applied.append, machine.stat, lambda: machine.now, machine.cpus)
    machine.run(threads.CHECK_S * 2, 4.0)
    sharing.tick()
    assert applied == []
