"""Eight training jobs at once against `lr-finder server`: on PostgreSQL every row arrives; on sqlite, measured.

Also: writers logging one dataset at the same moment, the race the eight jobs hit on PostgreSQL.

Starts its own PostgreSQL (initdb into a temporary folder, loopback only) and its own servers. The figures go to
test-artifacts/server-load-*.json and to the output (pytest -s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlproject.record.outputs import DataInput
from mlproject.record.tracker import RunTracker
from tests.helpers import REPO, as_options, free_port, requires_fashion_mnist, run_jobs, running_server, small_job

pytestmark = [pytest.mark.slow, requires_fashion_mnist]
JOBS, EPOCHS = 8, 2
JOB = ["train", *as_options(small_job(train_subset=1000, epochs=EPOCHS, val_size=500))]
EPOCH_METRICS = ("train_loss", "val_loss", "val_acc")
JOBS_TIMEOUT_S = 600
# Then a burst well above what training jobs send: WRITERS threads at once, BATCHES log_batch calls of 10 metrics each.
WRITERS, BATCHES, KEYS = 32, 20, 10
HTTP_5XX = re.compile(r'HTTP/1\.1" 5\d\d')
# Jobs that log one dataset at the same moment: RACERS writers released together, ROUNDS times, a new dataset each.
RACERS, ROUNDS = 12, 6


def postgres_bin() -> Path | None:
    """Debian keeps initdb and pg_ctl out of PATH, under /usr/lib/postgresql/VERSION/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL on a free loopback port; yields the database URI. Run as `postgres` when root."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL not installed: apt-get install postgresql (bash .ci/setup --tests does)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="lr-finder-pg-"))  # not tmp_path: the server's user must own it
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data = free_port(), folder / "data"

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_user, str(bindir / tool), *args], check=True, capture_output=True, timeout=120)

    pg("initdb", "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"
    pg("pg_ctl", "-D", str(data), "-l", str(folder / "postgres.log"), "-w", "-t", "60", "-o", options, "start")
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Load:
    backend: str
    jobs: int
    jobs_ok: int
    runs_finished: int
    rows_expected: int
    rows_found: int
    seconds: float
    slowest_job_s: float
    server_start_s: float
    burst_requests: int
    burst_rows_expected: int
    burst_rows_found: int
    burst_seconds: float
    burst_errors: list[str]
    http_5xx: int
    finished_but_incomplete: list[str]
    server_errors: list[str]
    job_errors: list[str]


def apply_load(backend_uri: str, label: str, folder: Path, with_burst: bool = True) -> tuple[Load, str]:
    """Start the server, run JOBS jobs at once into a fresh experiment, count what arrived; then the burst."""
    with running_server(folder, backend_uri) as server:
        began = time.monotonic()
        jobs = [[*JOB, "--seed", str(seed)] for seed in range(JOBS)]
        results = run_jobs(server.url, "load", jobs, folder / "jobs", JOBS_TIMEOUT_S)
        seconds = time.monotonic() - began
        client = MlflowClient(server.url)
        runs = client.search_runs([client.get_experiment_by_name("load").experiment_id])
        rows = {
            r.info.run_id: sum(len(client.get_metric_history(r.info.run_id, k)) for k in EPOCH_METRICS) for r in runs
        }
        whole = EPOCHS * len(EPOCH_METRICS)
        burst_rows, burst_s, burst_errors = burst(server.url) if with_burst else (0, 0.0, [])
        log = server.log_text()
        load = Load(
            backend=label,
            jobs=JOBS,
            jobs_ok=sum(r.code == 0 for r in results),
            runs_finished=sum(r.info.status == "FINISHED" for r in runs),
            rows_expected=JOBS * EPOCHS * len(EPOCH_METRICS),
            rows_found=sum(rows.values()),
            seconds=round(seconds, 1),
            slowest_job_s=round(max(r.seconds for r in results), 1),
            server_start_s=round(server.startup_s, 1),
            burst_requests=WRITERS * BATCHES if with_burst else 0,
            burst_rows_expected=WRITERS * BATCHES * KEYS if with_burst else 0,
            burst_rows_found=burst_rows,
            burst_seconds=round(burst_s, 1),
            burst_errors=burst_errors[:5],
            http_5xx=len(HTTP_5XX.findall(log)),
            finished_but_incomplete=[
                r.info.run_id for r in runs if r.info.status == "FINISHED" and rows[r.info.run_id] != whole
            ],
            server_errors=[line[:300] for line in log.splitlines() if "ERROR" in line or "Traceback" in line],
            job_errors=[r.output[-1500:] for r in results if r.code != 0],
        )
    record(load)
    return load, log


def burst(url: str) -> tuple[int, float, list[str]]:
    """WRITERS clients logging at once into their own runs; returns the rows that arrived, seconds, errors."""
    client = MlflowClient(url)
    experiment = client.create_experiment("burst")
    runs = [client.create_run(experiment).info.run_id for _ in range(WRITERS)]
    errors: list[str] = []

    def write(run_id: str) -> None:
        own = MlflowClient(url)
        for step in range(BATCHES):
            metrics = [Metric(f"m{k}", float(step), int(time.time() * 1000), step) for k in range(KEYS)]
            try:
                own.log_batch(run_id, metrics=metrics)
            except MlflowException as exc:
                errors.append(exc.message[:300])

    began = time.monotonic()
    with ThreadPoolExecutor(WRITERS) as pool:
        list(pool.map(write, runs))
    seconds = time.monotonic() - began
    rows = sum(len(client.get_metric_history(r, f"m{k}")) for r in runs for k in range(KEYS))
    return rows, seconds, errors


def record(load: Load) -> None:
    out = REPO / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / f"server-load-{load.backend}.json").write_text(json.dumps(asdict(load), indent=2) + "\n")
    print(
        f"\n{load.backend}: {load.jobs_ok}/{load.jobs} jobs ok, {load.runs_finished} runs FINISHED, "
        f"{load.rows_found}/{load.rows_expected} epoch rows, {load.seconds} s for all jobs "
        f"(server ready after {load.server_start_s} s); burst: {WRITERS} writers, {load.burst_requests} requests, "
        f"{load.burst_rows_found}/{load.burst_rows_expected} rows in {load.burst_seconds} s, "
        f"{len(load.burst_errors)} client errors; {load.http_5xx} HTTP 5xx, {len(load.server_errors)} server log errors"
    )


def test_postgresql_server_takes_eight_concurrent_jobs_without_losing_a_row(tmp_path):
    with postgres() as uri:
        load, log = apply_load(uri, "postgresql", tmp_path)
    assert load.jobs_ok == JOBS, load.job_errors
    assert load.runs_finished == JOBS
    assert load.rows_found == load.rows_expected and not load.finished_but_incomplete
    assert load.burst_rows_found == load.burst_rows_expected and not load.burst_errors
    assert load.http_5xx == 0
    assert not load.server_errors, "\n".join(load.server_errors)
    assert "Traceback" not in log


def test_sqlite_server_under_the_same_load_never_reports_a_finished_run_with_missing_rows(tmp_path):
    """sqlite serialises writers on one file lock: record what that costs; a run it calls FINISHED must be whole.
    No burst: on sqlite its writers wait out 30 s connection timeouts, and lose rows (benchmarks/RESULTS.md)."""
    load, _ = apply_load(f"sqlite:///{tmp_path}/mlflow.db", "sqlite", tmp_path, with_burst=False)
    assert not load.finished_but_incomplete
    assert load.runs_finished == load.jobs_ok, "a job's exit code and its run's status agree"


def test_jobs_logging_one_dataset_at_the_same_moment_all_link_to_a_single_row_on_postgresql(tmp_path):
    """The server checks for the dataset, then inserts it: writers released at once collide on PostgreSQL's key."""
    with postgres() as uri, running_server(tmp_path, uri) as server:
        client = MlflowClient(server.url)
        experiment = client.create_experiment("race")
        errors: list[str] = []
        for round_ in range(ROUNDS):
            images = np.random.default_rng(round_).integers(0, 256, (100, 28, 28), dtype=np.uint8)
            runs = [client.create_run(experiment).info.run_id for _ in range(RACERS)]
            errors += log_one_dataset_at_once(server.url, runs, images, np.arange(100) % 10)
            linked = [client.get_run(r).inputs.dataset_inputs for r in runs]
            assert all(len(inputs) == 1 for inputs in linked), f"round {round_}: a run lacks its dataset"
            assert len({inputs[0].dataset.digest for inputs in linked}) == 1
            assert all(inputs[0].tags[0].value == "testing" for inputs in linked)
        log = server.log_text()
    assert not errors, errors[:2]
    assert "Traceback" not in log


def log_one_dataset_at_once(url: str, runs: list[str], images: np.ndarray, labels: np.ndarray) -> list[str]:
    """Each run's Tracker logs the same dataset, all released by one barrier; returns the errors they raised."""
    start, errors = threading.Barrier(len(runs)), []

    def race(run_id: str) -> None:
        tracker = RunTracker(MlflowClient(url), run_id)
        start.wait()
        try:
            tracker.log_dataset(DataInput("test", "testing", "/data/fashion-mnist", (images, labels)))
        except MlflowException as exc:
            errors.append(exc.message[:300])

    with ThreadPoolExecutor(len(runs)) as pool:
        list(pool.map(race, runs))
    return errors
