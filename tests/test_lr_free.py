"""Learning-rate-free optimizers through the job: Schedule-Free AdamW and Prodigy train the built-in networks with no
range test (lr_source=lr-free), the model logged is the one that was evaluated, the study trains them as members,
and what they cannot do is refused in one line. The container runs Schedule-Free in tests/test_docker.py."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from mlproject.config import LR_FREE, JobConfig
from mlproject.training import task
from tests.helpers import REPO, as_options, finish, job_env, runs_of, small_job, start_job

# The tiny written dataset, no range test, two epochs.
TINY = small_job(train_subset=0, val_size=100, batch_size=32, accelerator="cpu", seed=7, auto_lr=False, epochs=2)


def run(tmp: Path, data: Path, experiment: str, **changes: object) -> tuple[int, str, MlflowClient]:
    uri = f"sqlite:///{tmp}/mlflow.db"
    args = as_options(small_job(**{**TINY, "data_dir": str(data), **changes}))
    code, _, err = finish(start_job(tmp, "train", *args, env=job_env(uri), experiment=experiment))
    return code, err, MlflowClient(uri)


def test_schedulefree_trains_without_a_range_test_and_logs_the_averaged_model_it_evaluated(tmp_path, tiny_data):
    code, err, client = run(tmp_path, tiny_data, "sf", optimizer="schedulefree", model="cnn_bn")
    assert code == 0, err[-3000:]
    (found,) = runs_of(f"sqlite:///{tmp_path}/mlflow.db", "sf")
    params, tags, metrics = found.data.params, found.data.tags, found.data.metrics
    assert params["lr_source"] == "lr-free" and float(params["lr_used"]) == LR_FREE["schedulefree"]
    assert tags["optimizer_class"] == "schedulefree.adamw_schedulefree.AdamWScheduleFree"
    assert "lr_suggested" not in params and not client.list_artifacts(found.info.run_id, "lr_find")
    # The model logged is the averaged one the test measured (BatchNorm's statistics measured at it): the same
    # accuracy on the same test batches. The weights a step moves would score otherwise.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    (logged,) = mlflow.search_logged_models(experiment_ids=[found.info.experiment_id], output_format="list")
    model = mlflow.pyfunc.load_model(logged.model_uri)
    cfg = JobConfig.from_params(found.data.params)
    right = total = 0
    for x, y in task.build(cfg).data.loaders(cfg.seed, "cpu").test:
        right += int((np.asarray(model.predict(x.numpy())).argmax(axis=1) == y.numpy()).sum())
        total += len(y)
    assert right / total == pytest.approx(metrics["test_acc"], abs=1e-6)
    # Each checkpoint holds the averaged weights too, so that a resumed fit goes on from what was evaluated.
    checkpoint = torch.load(
        client.download_artifacts(found.info.run_id, "checkpoints/last.ckpt", str(tmp_path)), weights_only=False
    )
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [g["train_mode"] for g in groups] == [False] * len(groups)


def test_prodigy_trains_under_cosine_and_records_its_own_step_size_each_epoch(tmp_path, tiny_data):
    code, err, client = run(tmp_path, tiny_data, "prodigy", optimizer="prodigy", epochs=3)
    assert code == 0, err[-3000:]
    (found,) = runs_of(f"sqlite:///{tmp_path}/mlflow.db", "prodigy")
    assert found.data.params["lr_source"] == "lr-free" and float(found.data.params["lr_used"]) == 1.0
    assert found.data.tags["optimizer_class"] == "prodigyopt.prodigy.Prodigy"
    rates = [m.value for m in client.get_metric_history(found.info.run_id, "learning_rate")]
    assert rates[0] == 1.0 and rates[0] > rates[1] > rates[2] > 0, "cosine from lr down to 0 over the fit"
    effective = [m.value for m in client.get_metric_history(found.info.run_id, "effective_lr")]
    assert len(effective) == 3 and all(0 < v < 1 for v in effective), "d x lr: Prodigy's estimate, far below 1"
    assert found.data.metrics["test_acc"] > 0.5


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"optimizer": "prodigy", "model": "tabular.TabularRegressor", "dataset": "tabular.SyntheticTabular"},
         "error: invalid value for optimizer: 'prodigy'; expected adam, or an optimizer's class path, for a "
         "LightningModule of your own (its optimizer is its own)"),
        ({"optimizer": "schedulefree", "auto_lr": True},
         "error: invalid value for auto_lr: 'true'; expected false with optimizer=schedulefree: it sets its own step "
         "size, there is no LR to find"),
        ({"optimizer": "schedulefree", "schedule": "onecycle"},
         "error: invalid value for schedule: 'onecycle'; expected auto or constant with optimizer=schedulefree: it "
         "schedules itself"),
    ],
)  # fmt: skip
def test_what_an_lr_free_optimizer_cannot_do_is_refused_in_one_line(tmp_path, tiny_data, changes, line):
    code, err, _ = run(tmp_path, tiny_data, "refused", **changes, code=str(REPO / "examples" / "tabular"))
    assert code == 2
    assert err.strip().splitlines()[-1] == line


def test_a_study_trains_lr_free_members_beside_the_fixed_lrs_and_compares_them(tmp_path, tiny_data):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--lrs", "1e-3", "--lr-free", "schedulefree,prodigy", *as_options({**TINY, "data_dir": str(tiny_data)})]
    code, out, err = finish(start_job(tmp_path, "compare", *args, env=job_env(uri), experiment="study"))
    assert code == 0, err[-3000:]
    members = {r.info.run_name: r for r in runs_of(uri, "study") if "mlflow.parentRunId" in r.data.tags}
    assert sorted(members) == ["lr=0.001", "prodigy", "schedulefree"]
    assert {name: r.data.params["lr_source"] for name, r in members.items()} == {
        "lr=0.001": "fixed", "prodigy": "lr-free", "schedulefree": "lr-free"
    }  # fmt: skip
    assert members["prodigy"].data.tags["optimizer_class"] == "prodigyopt.prodigy.Prodigy"
    assert members["lr=0.001"].data.tags["optimizer_class"] == "torch.optim.adam.Adam"
    assert "| schedulefree | 0.0025 | lr-free | FINISHED |" in out


def test_a_study_refuses_an_unknown_lr_free_name_before_training(tmp_path, tiny_data):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--lr-free", "adam", *as_options({**TINY, "data_dir": str(tiny_data)})]
    code, _, err = finish(start_job(tmp_path, "compare", *args, env=job_env(uri), experiment="bad"))
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "error: invalid value for lr_free: 'adam'; expected a comma-separated list of schedulefree, prodigy, or empty"
    )
