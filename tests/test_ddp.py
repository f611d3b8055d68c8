"""More than one process, for real: Lightning's DDP on the CPU (gloo) under torchrun, one machine and two "nodes" on
loopback. The range test of the global batch, one tracked run, SIGTERM to every rank, a rank killed outright."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import (
    BIN,
    as_options,
    finish,
    free_port,
    job_env,
    requires_fashion_mnist,
    runs_of,
    small_job,
    wait_for_metric,
)

pytestmark = [pytest.mark.slow, requires_fashion_mnist]
# fp32 on both sides: the 2-process sweep must equal the 1-process one within float tolerance, not bf16's. The sweep
# stops at 0.01: a fit at the edge of Adam's stable LRs (0.04 here) carries DDP's last-bit difference in summing the
# gradient into the second decimal of val_loss within a hundred steps; a fit below it keeps it in the fourth.
EXACT = small_job(train_subset=6400, val_size=1024, lr_steps=40, lr_max=0.01, precision="32-true", accelerator="cpu")


def start(tmp: Path, *args: str, uri: str, experiment: str = "ddp", **env: str) -> subprocess.Popen:
    """The job in its own process group, as a launcher starts it; its output captured."""
    cmd = [sys.executable, "-m", "mlproject", "train", "--experiment-name", experiment, *args]
    return subprocess.Popen(
        cmd, cwd=tmp, env=job_env(uri, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def curve(client: MlflowClient, run_id: str) -> list[dict[str, str]]:
    text = Path(client.download_artifacts(run_id, "lr_find/curve.csv")).read_text()
    return list(csv.DictReader(io.StringIO(text)))


def only(uri: str, experiment: str):
    (run,) = runs_of(uri, experiment)
    return run


def test_two_processes_at_batch_b_sweep_and_train_exactly_as_one_at_batch_2b(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # One thread in every process, so that a conv sums in the same order in both jobs.
    one = start(tmp_path, *as_options({**EXACT, "batch_size": "64"}), uri=uri, experiment="one", OMP_NUM_THREADS="1")
    code, _, err = finish(one)
    assert code == 0, err[-3000:]
    twice = as_options({**EXACT, "batch_size": "32", "devices": "2"})
    two = start(tmp_path, *twice, uri=uri, experiment="two", OMP_NUM_THREADS="1")
    code, _, err = finish(two)
    assert code == 0, err[-3000:]
    client = MlflowClient(uri)
    a, b = only(uri, "one"), only(uri, "two")
    rows_a, rows_b = curve(client, a.info.run_id), curve(client, b.info.run_id)
    assert len(rows_a) == len(rows_b) >= 20
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert float(ra["lr"]) == pytest.approx(float(rb["lr"]), rel=1e-6)
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-4, abs=1e-5)
    assert float(b.data.params["lr_suggested"]) == pytest.approx(float(a.data.params["lr_suggested"]), rel=1e-3)
    for key in ("val_loss", "val_acc", "train_loss"):
        assert b.data.metrics[key] == pytest.approx(a.data.metrics[key], rel=2e-3), key
    summary = client.download_artifacts(b.info.run_id, "lr_find/summary.json")
    assert '"world_size": 2' in Path(summary).read_text() and '"effective_batch_size": 64' in Path(summary).read_text()
    assert b.data.tags["world_size"] == "2"


def test_a_job_of_two_processes_makes_one_run_with_one_row_per_epoch_on_a_tracking_server(tmp_path, team_server):
    args = as_options(small_job(epochs=2, devices=2, lr_steps=30))
    code, out, err = finish(start(tmp_path, *args, uri=team_server.url, experiment="ddp-server", **team_server.env()))
    assert code == 0, err[-3000:]
    uri = team_server.with_credentials()
    client = MlflowClient(uri)
    (run,) = runs_of(uri, "ddp-server")
    assert run.info.status == "FINISHED"
    for key in ("val_loss", "val_acc", "train_loss", "epoch_seconds", "learning_rate"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr_suggested")] == [0]
    mlflow.set_tracking_uri(uri)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [run.info.run_id]
    assert out.count(f"run {run.info.run_id}:") == 1  # rank 0 alone reports


def worker_pids(uri: str) -> dict[int, int]:
    """rank -> pid of the torchrun workers of the job tracking to `uri`, read from /proc."""
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = dict(item.split("=", 1) for item in environ.read_bytes().decode().split("\0") if "=" in item)
        except (OSError, ValueError):
            continue
        if env.get("TORCHELASTIC_RUN_ID") and env.get("MLFLOW_TRACKING_URI") == uri:
            found[int(env["RANK"])] = int(environ.parent.name)
    return found


FOUR_EPOCHS = as_options(small_job(train_subset=8000, val_size=1000, epochs=4, lr_steps=30, devices=2))


def test_sigterm_to_every_rank_stops_all_once_and_resume_at_the_same_world_size_finishes_alike(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    job = start(tmp_path, *FOUR_EPOCHS, uri=uri)
    run_id = wait_for_metric(client, "ddp", "epoch_seconds", process=job)
    workers = worker_pids(uri)
    assert set(workers) == {0, 1}
    os.killpg(job.pid, signal.SIGTERM)  # what Kubernetes and Slurm do: every process of the job
    for pid in workers.values():
        os.kill(pid, signal.SIGTERM)
    code, _, err = finish(job, timeout=120)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/last.ckpt"]
    assert f"resume={run_id}" in Path(client.download_artifacts(run_id, "error.txt")).read_text()
    assert len(client.get_metric_history(run_id, "val_acc")) < 4

    code, _, err = finish(start(tmp_path, "--resume", run_id, "--devices", "2", uri=uri))
    assert code == 0, err[-3000:]
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [0, 1, 2, 3]

    code, out, err = finish(start(tmp_path, *FOUR_EPOCHS, uri=uri, experiment="straight"))
    assert code == 0, err[-3000:]
    straight = only(uri, "straight")
    for key in ("test_acc", "test_loss", "final_val_acc", "final_val_loss", "lr_used"):
        assert resumed.data.params[key] == straight.data.params[key], key


def test_a_rank_killed_outright_fails_the_job_and_its_run_within_bounded_time(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    job = start(tmp_path, *FOUR_EPOCHS, uri=uri)
    run_id = wait_for_metric(client, "ddp", "epoch_seconds", process=job)
    pids = worker_pids(uri)
    assert set(pids) == {0, 1}
    killed = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    code, _, err = finish(job, timeout=180)
    took = time.monotonic() - killed
    assert code != 0 and took < 90, (code, took, err[-3000:])
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert "rank 1" in Path(client.download_artifacts(run_id, "error.txt")).read_text()


def test_two_nodes_on_loopback_each_with_its_own_disk_track_one_run(tmp_path):
    """torchrun --nnodes 2 on 127.0.0.1. The second node runs with a tmpfs over the first one's folders: the range
    test's snapshot must stay in memory (Lightning's own writes a file on rank 0 that every rank reads)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to give the second node a file system of its own")
    uri = f"sqlite:///{tmp_path}/shared/mlflow.db"
    (tmp_path / "shared").mkdir()
    port = free_port()
    job = as_options(small_job(epochs=1, num_nodes=2, devices=1, lr_steps=30))
    nodes = []
    for rank in (0, 1):
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        torchrun = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank)]
        torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "mlproject", "train", *job]
        torchrun += ["--experiment-name", "nodes"]
        if rank == 1:  # node 0's folder is a fresh, empty tmpfs here
            hidden = tmp_path / "node0"
            command = f"mount -t tmpfs tmpfs {hidden} && cd {folder} && exec {' '.join(torchrun)}"
            torchrun = ["unshare", "-m", "sh", "-c", command]
        env = job_env(uri, TMPDIR=str(folder))
        nodes.append(subprocess.Popen(torchrun, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip
    results = [finish(node, timeout=600) for node in nodes]
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    (run,) = runs_of(uri, "nodes")
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert "test_acc" in run.data.params
    assert not list((tmp_path / "node0").glob(".lr_find_*")), "the snapshot stayed in memory"


def test_a_study_of_two_processes_makes_one_parent_and_a_child_per_member_each_trained_under_ddp(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = as_options(small_job(devices=2, lr_steps=30, val_size=500))
    cmd = [sys.executable, "-m", "mlproject", "compare", "--experiment-name", "study", *args, "--lrs", "1e-3"]
    code, out, err = finish(subprocess.Popen(cmd, cwd=tmp_path, env=job_env(uri), stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True))  # fmt: skip
    assert code == 0, err[-3000:]
    runs = runs_of(uri, "study")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["study_member"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert sorted(children) == ["lr=0.001", "lr=finder"] and len(runs) == 3  # no run of rank 1's
    assert all(c.info.status == "FINISHED" and c.data.tags["world_size"] == "2" for c in children.values())
    assert children["lr=finder"].data.params["lr_suggested"] == parent.data.params["lr_suggested"]
    assert parent.info.status == "FINISHED" and parent.data.tags["study_complete"] == "true"
    assert out.count("| lr=finder |") == 1  # rank 0 alone prints the comparison


def test_a_study_of_several_devices_refuses_parallel_members_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "mlproject", "compare", "--devices", "2", "--parallel", "2"]
    done = subprocess.run(cmd, cwd=tmp_path, env=job_env(f"sqlite:///{tmp_path}/m.db"), capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: invalid value for parallel: 2; expected 1 when a member trains on several devices (devices x "
        "num_nodes > 1)"
    ]
