"""The benchmark scripts run at the code as it is, at their smallest sizes: a script that no longer follows the job
fails here rather than on the day its figures are needed. Their figures are in benchmarks/RESULTS.md; nothing here
times anything."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import FASHION_DIR, REPO, requires_fashion_mnist


def benchmark(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(output: str) -> list[list[str]]:
    """A markdown table's rows as lists of cells, header and rule left out."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in output.splitlines() if line.startswith("|")]
    return rows[2:]


@requires_fashion_mnist
def test_the_step_benchmark_times_the_job_against_each_variant():
    output = benchmark("benchmarks.step", "--data-dir", str(FASHION_DIR), "--blocks", "2", "--steps", "3")
    rows = {cells[0]: cells[1:] for cells in table_rows(output)}
    expected = ["this job (Lightning fit)", "the same, NVML check on", "the same, ReLU before pooling (textbook order)"]
    expected += ["the same, channels_last off", "Lightning Fabric loop", "bare PyTorch loop"]
    assert list(rows) == expected
    assert all(float(cell) > 0 for cells in rows.values() for cell in cells)
    assert rows["this job (Lightning fit)"][-1] == "1.000"  # the job against itself


def test_the_overhead_benchmark_fits_a_users_module_both_ways():
    output = benchmark("benchmarks.overhead", "--cases", "tabular", "--epochs", "1", "--repeats", "2")
    rows = table_rows(output)
    assert [cells[:2] for cells in rows] == [["tabular", "1"], ["tabular", "2"], ["tabular", "median of 2"]]
    plain, job, ratio = (float(cell) for cell in rows[0][2:])
    assert plain > 0 and job > 0 and abs(ratio - job / plain) < 0.05  # the times are printed to 0.01 s
    assert re.fullmatch(r"\*\*\d\.\d{3}\*\*", rows[2][-1])
