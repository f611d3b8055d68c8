"""The job in-process on a small written dataset: the finder does not change what fit does; fallbacks are recorded."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from mlproject import pipeline
from mlproject.config import JobConfig
from mlproject.errors import Preempted, TrainingDiverged
from mlproject.finder import choose, rules
from mlproject.finder.rules import suggest
from mlproject.processes import stopping
from mlproject.processes.ranks import Place
from mlproject.record.tracker import RunTracker
from mlproject.session import Session
from mlproject.training import batches, idx, runtime, task
from mlproject.training.networks import lenet
from tests.helpers import FASHION_DIR, as_options, requires_fashion_mnist, small_job

# The small job on tests/helpers.write_dataset's 300 images.
TINY = small_job(train_subset=0, val_size=100, batch_size=32, accelerator="cpu", seed=7, auto_lr=False)


def run_job(
    tmp: Path, folder: Path, tracker: type[RunTracker] = RunTracker, **changes
) -> tuple[pipeline.JobResult, dict]:
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    if client.get_experiment_by_name("pipe") is None:
        client.create_experiment("pipe", artifact_location=str(tmp / "artifacts"))
    cfg = JobConfig.from_params(TINY).replace(data_dir=str(folder), **changes)
    tracker = tracker.open(uri, "", "pipe")
    try:
        work = tmp / tracker.run_id
        work.mkdir()
        result = pipeline.run(Session(cfg, task.build(cfg), tracker, work, None, Place()))
    finally:
        tracker.end("FINISHED")
    return result, client.get_run(tracker.run_id).data.params


def test_the_range_test_does_not_change_what_fit_does(tmp_path, tiny_data):
    found, params = run_job(tmp_path, tiny_data, auto_lr=True, schedule="constant", epochs=2)
    assert params["lr_source"] == "finder"
    fixed, _ = run_job(tmp_path, tiny_data, auto_lr=False, lr=found.choice.lr, schedule="constant", epochs=2)
    assert fixed.final == found.final


NVML_PROBES = """
import sys, torch.cuda
probes = []
real = torch.cuda._device_count_nvml
torch.cuda._device_count_nvml = lambda: probes.append(1) or real()
from mlproject.__main__ import main
print("exit", main(sys.argv[1:]), "probes", len(probes))
"""


def test_a_cpu_job_does_not_probe_for_a_gpu_at_every_step(tmp_path, tiny_data):
    """Importing Lightning turns on torch's NVML-based CUDA check, which then loads libnvidia-ml at every optimizer
    step. The job imports Lightning late (the package of the user's module), so it must switch the check off after
    that import, as a fresh process does it."""
    params = small_job(**{**TINY, "data_dir": str(tiny_data), "auto_lr": True, "epochs": 2})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    args = [sys.executable, "-c", NVML_PROBES, "train", *as_options(params)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    *_, code, _, probes = done.stdout.split()
    assert code == "0", done.stderr[-2000:]
    steps = 2 * math.ceil(200 / 32)  # the fit's optimizer steps alone (200 training images, batch 32)
    assert int(probes) < steps  # a few as the Trainer starts; not one a step


class SignalledAsTheFirstEpochShows(RunTracker):
    """A real SIGTERM to this process, the moment the job starts to show its first finished epoch."""

    def log_metrics(self, metrics, step=0):
        if "epoch_seconds" in metrics and step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        super().log_metrics(metrics, step=step)


@pytest.fixture
def stop_signals():
    """The job's SIGTERM and SIGINT handlers, for one test; pytest's own come back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in stopping.STOP_SIGNALS}
    stopping.install()
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_sigterm_as_an_epoch_shows_lets_its_report_and_checkpoint_land_whole(tmp_path, tiny_data, stop_signals):
    with pytest.raises(Preempted, match="SIGTERM"):
        run_job(tmp_path, tiny_data, SignalledAsTheFirstEpochShows, schedule="constant", epochs=3)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("pipe").experiment_id])
    for key in ("epoch_seconds", "val_acc", "train_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0], key
    local = client.download_artifacts(run.info.run_id, "checkpoints/last.ckpt", str(tmp_path))
    assert torch.load(local, weights_only=False)["epoch"] == 0


def test_after_the_stop_signal_a_second_one_does_not_interrupt_the_clean_up(stop_signals):
    """The first signal stops the job; a second (another Ctrl-C, the SIGTERM after a SIGINT) while it writes its
    checkpoint and ends its run must not interrupt that."""
    with pytest.raises(Preempted, match="SIGTERM"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode, long before this ends
    os.kill(os.getpid(), signal.SIGINT)  # a signal to this process is handled before os.kill returns:
    os.kill(os.getpid(), signal.SIGTERM)  # had either raised, the test would fail here


def test_flat_sweep_falls_back_to_lr_and_records_why(tmp_path, tiny_data):
    # An LR range this small cannot move the loss: the curve is flat, so the job trains at `lr` instead.
    result, params = run_job(tmp_path, tiny_data, auto_lr=True, lr_min=1e-12, lr_max=1e-11, lr=0.002, epochs=1)
    assert params["lr_source"] == "fallback"
    assert float(params["lr_used"]) == pytest.approx(0.002)
    assert "flat" in result.choice.range_test.suggestion.reason


def test_diverging_training_stops_with_a_clear_error(tmp_path, tiny_data):
    with pytest.raises(TrainingDiverged, match=r"training loss is (nan|inf).*lower lr"):
        run_job(tmp_path, tiny_data, optimizer="sgd", lr=1e4, schedule="constant", epochs=2)


def test_repeated_range_tests_use_the_median_and_log_the_spread(tmp_path, tiny_data):
    _, params = run_job(tmp_path, tiny_data, auto_lr=True, lr_repeats=3, schedule="constant", epochs=1)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("pipe").experiment_id])]
    summary = json.loads(
        Path(client.download_artifacts(run.info.run_id, "lr_find/summary.json", str(tmp_path))).read_text()
    )
    values = sorted(summary["repeat_suggestions"])
    assert summary["repeats"] == 3 and len(values) == 3
    assert float(params["lr_suggested"]) == pytest.approx(values[1], rel=1e-5)
    assert summary["spread_decades"] == pytest.approx(math.log10(values[2] / values[0]))
    assert run.data.metrics["lr_spread"] == pytest.approx(summary["spread_decades"])


def test_probe_mode_suggests_from_the_held_out_curve_and_logs_both(tmp_path, tiny_data):
    _, params = run_job(tmp_path, tiny_data, auto_lr=True, lr_probe=True, schedule="constant", epochs=1)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("pipe").experiment_id])
    local = Path(client.download_artifacts(run.info.run_id, "lr_find", str(tmp_path)))
    summary = json.loads((local / "summary.json").read_text())
    rows = (local / "curve.csv").read_text().splitlines()
    assert rows[0] == "step,lr,loss,smoothed_loss,probe_loss" and len(rows) == summary["steps_run"] + 1
    assert summary["signal"] == "validation probe" and "train_curve_suggestion" in summary
    probe = [float(r.split(",")[4]) for r in rows[1:]]
    lrs = [float(r.split(",")[1]) for r in rows[1:]]
    expected = suggest(lrs, probe, fallback_lr=1e-3, train_steps=summary["fit_steps"]).lr
    assert float(params["lr_suggested"]) == pytest.approx(expected, rel=1e-4)


def test_compile_trains_the_same_network_and_keeps_its_checkpoint_names(tmp_path, tiny_data):
    (tmp_path / "eager").mkdir()
    (tmp_path / "compiled").mkdir()
    eager, _ = run_job(tmp_path / "eager", tiny_data, schedule="constant", epochs=1)
    compiled, _ = run_job(tmp_path / "compiled", tiny_data, schedule="constant", epochs=1, compile=True)
    # Same weights, same batches; the compiled kernels round differently, so the figures agree closely.
    assert compiled.final["test_loss"] == pytest.approx(eager.final["test_loss"], rel=0.02)
    (checkpoint,) = (tmp_path / "compiled").glob("*/last.ckpt")
    keys = set(torch.load(checkpoint, weights_only=False)["state_dict"])
    assert keys == {f"net.{k}" for k in lenet().state_dict()}


@requires_fashion_mnist
def test_the_range_test_stops_once_the_curve_has_diverged_and_suggests_what_the_full_sweep_would():
    cfg = JobConfig(train_subset=8000, val_size=500, accelerator="cpu", precision="32-true", seed=3)
    job, rt = task.build(cfg.replace(data_dir=str(FASHION_DIR))), runtime.detect_runtime(cfg)
    early_test, full_test = choose.range_test(cfg, job, rt), choose.range_test(cfg, job, rt, stop_early=False)
    early, early_found = early_test.curve, early_test.suggestion
    full, full_found = full_test.curve, full_test.suggestion
    assert early.steps_run < full.steps_run == cfg.lr_steps  # LeNet/Adam diverges before lr_max=1
    assert early.losses == full.losses[: early.steps_run]  # the same sweep, cut short
    assert early_found.lr == pytest.approx(full_found.lr)
    # The early stop cut the curve where the full sweep's usable part ends, for the same reason.
    assert early.stop_reason and early.stop_reason == full_test.usable.reason and full.stop_reason == ""


@requires_fashion_mnist
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lenet_pooling_before_relu_gives_the_textbook_values_and_gradients_bit_for_bit(precision):
    """LeNet's blocks pool, then ReLU (cheaper); against the textbook's ReLU, then max-pool, on real images with
    ties at zero, nothing may differ."""
    net = lenet().to(memory_format=torch.channels_last)
    relu, pool = torch.nn.ReLU(), torch.nn.MaxPool2d(2)
    textbook = torch.nn.Sequential(net[0], relu, pool, net[3], relu, pool, *net[6:])
    ds = idx.load("fashion-mnist", idx.Source((FASHION_DIR,)), 100, 0, seed=0)
    x = batches.normalize(ds.train.images[:256], ds.mean, ds.std).contiguous(memory_format=torch.channels_last)
    y = ds.train.labels[:256]
    outputs, grads = [], []
    for model in (net, textbook):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        outputs.append(logits)
        grads.append([p.grad.clone() for p in net.parameters()])
    assert isinstance(net[1], torch.nn.MaxPool2d) and isinstance(net[2], torch.nn.ReLU)
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@requires_fashion_mnist
@pytest.mark.parametrize("seed", [42, 43])
def test_a_short_sgd_job_asking_for_a_sparse_sweep_trains_off_the_cliff(tmp_path, seed):
    # SGD with momentum on 2,000 images for 2 epochs, a sweep of 20 steps asked: read at 3.3 steps a decade, its curve
    # put the LR at 0.13-0.25, where these fits end at 10-20% test accuracy.
    short = {"optimizer": "sgd", "lr_steps": 20, "epochs": 2, "train_subset": 2000, "batch_size": 64}
    result, params = run_job(tmp_path, FASHION_DIR, auto_lr=True, val_size=5000, seed=seed, **short)
    found = result.choice.range_test
    assert found.curve.steps_requested == 48 and found.lr_steps == 20, "eight steps a decade at least"
    assert found.curve.momentum == 0.9
    edge = rules.cliff(found.usable, found.curve.momentum)
    assert edge is not None and float(params["lr_used"]) <= edge / rules.CLIFF_MARGIN
    assert result.final["test_acc"] >= 0.5
