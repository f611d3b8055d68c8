"""Code nobody here wrote, as its authors wrote it (tests/their_code/theirs.py, Lightning's own demo classes, a config
LightningCLI printed): the LR the run records is the LR the optimizer trained at, the author's LR is kept unless one
is given, and what the run says was applied was applied. Each job is a real process on small random data."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlproject.training import lightning_api
from tests.helpers import REPO, finish, job_env, mlflow_run, requires_fashion_mnist, runs_of, start_job

CODE = REPO / "tests" / "their_code"
POINTS = ["--dataset", "theirs.Points", "--code", str(CODE), "--epochs", "2"]


def train(tmp: Path, *args: str, command: str = "train") -> tuple[int, str, object | None]:
    """The job on `args`; its exit code, stderr (and stdout, for check), and its one run (None when it started none)."""
    uri = f"sqlite:///{tmp}/mlflow.db"
    code, out, err = finish(start_job(tmp, command, *args, env=job_env(uri)), 300)
    runs = runs_of(uri, "jobs")
    assert len(runs) <= 1
    return code, out + err, runs[0] if runs else None


def history(tmp: Path, run: object, key: str) -> list[float]:
    return [m.value for m in MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_metric_history(run.info.run_id, key)]


# --- the LR the run records ------------------------------------------------------------------------------------

WAYS = {
    "an attribute in hparams": ["--model", "theirs.InHparams"],
    "a functools.partial passed in": ["--model", "theirs.FactoryGiven"],
    "LightningCLI's OptimizerCallable": [
        "--model", "theirs.CallableGiven",
        "--model-args", '{"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9}}}',
    ],
}  # fmt: skip


@pytest.mark.parametrize("way", WAYS, ids=list(WAYS))
def test_the_lr_the_range_test_chose_is_the_lr_the_optimizer_trained_at(tmp_path, way):
    code, err, run = train(tmp_path, *WAYS[way], *POINTS, "--auto-lr", "true", "--lr-verify", "off")
    assert code == 0, err[-3000:]
    params = run.data.params
    assert params["lr_source"] == "finder"
    used = float(params["lr_used"])
    assert used == pytest.approx(float(params["lr_suggested"]), rel=1e-5)  # its own schedule: none, constant
    assert history(tmp_path, run, "learning_rate") == pytest.approx([used, used], rel=1e-5)  # read from the optimizer


@pytest.mark.parametrize(
    "model, built_at", [("theirs.ClassGiven", "0.001"), ("theirs.ReadAtInit", "0.0005")], ids=["class", "init"]
)
def test_a_module_whose_optimizer_ignores_the_lr_set_is_stopped_in_one_line_before_any_run(tmp_path, model, built_at):
    for command in ("check", "train"):  # check says what the job says
        code, err, run = train(tmp_path, "--model", model, *POINTS, "--lr", "0.003", command=command)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err[-3000:]
        assert lines[0].startswith(f"error: invalid value for model: '{model.split('.')[1]}'; expected a module")
        assert f"but it built at {built_at}" in lines[0] and "lr_attr" in lines[0]
        assert run is None


def test_the_authors_lr_is_kept_unless_lr_is_given(tmp_path):
    code, err, run = train(tmp_path, "--model", "theirs.InHparams", *POINTS)
    assert code == 0, err[-3000:]
    assert (run.data.params["lr_source"], run.data.params["lr_used"]) == ("module", "0.0005")
    given = tmp_path / "given"
    given.mkdir()
    code, err, run = train(given, "--model", "theirs.InHparams", *POINTS, "--lr", "0.003")
    assert code == 0, err[-3000:]
    assert (run.data.params["lr_source"], run.data.params["lr_used"]) == ("fixed", "0.003")
    assert history(given, run, "learning_rate") == pytest.approx([0.003, 0.003])


def test_a_gan_with_manual_optimization_trains_at_its_own_lr_and_its_per_step_values_reach_the_run(tmp_path):
    code, err, run = train(tmp_path, "--model", "theirs.TwoOptimizers", *POINTS)
    assert code == 0, err[-3000:]
    assert run.info.status == "FINISHED"
    assert (run.data.params["lr_source"], run.data.params["lr_used"]) == ("module", "0.0002")
    for key in ("g_loss", "d_loss"):  # logged per step only: each epoch's mean
        values = history(tmp_path, run, key)
        assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), key
    refused, err, _ = train(tmp_path / "..", "--model", "theirs.TwoOptimizers", *POINTS, "--auto-lr", "true")
    assert refused == 2 and "the range test needs automatic optimization" in err


def test_a_module_without_an_lr_attribute_trains_at_its_own_and_is_refused_one_to_find(tmp_path):
    code, err, run = train(tmp_path, "--model", "theirs.FixedLR", *POINTS)
    assert code == 0, err[-3000:]
    assert (run.data.params["lr_source"], run.data.params["lr_used"]) == ("module", "0.05")
    code, err, _ = train(tmp_path / "..", "--model", "theirs.FixedLR", *POINTS, "--auto-lr", "true")
    assert code == 2 and "learning-rate attribute or optimizer factory" in err.strip().splitlines()[-1]


def test_an_lr_attr_that_names_no_number_is_one_line_before_any_run(tmp_path):
    code, err, run = train(tmp_path, "--model", "theirs.InHparams", *POINTS, "--lr-attr", "net", "--auto-lr", "true")
    assert code == 2 and err.strip().splitlines() == [
        "error: invalid value for lr_attr: 'net'; expected an attribute holding a number (it holds a Sequential)"
    ]
    assert run is None


def test_a_value_logged_under_a_name_mlflow_refuses_is_kept_under_one_it_takes(tmp_path):
    code, err, run = train(tmp_path, "--model", "theirs.OddNames", *POINTS, "--epochs", "3")
    assert code == 0, err[-3000:]
    assert run.info.status == "FINISHED"
    said = [line for line in err.splitlines() if "'val error (%)' is logged as 'val error ___'" in line]
    assert len(said) == 1, err[-3000:]  # once, not once an epoch
    assert len(history(tmp_path, run, "val error ___")) == 3  # every epoch's value kept
    assert len(history(tmp_path, run, "val_loss")) == len(history(tmp_path, run, "train_loss")) == 3  # the rest too
    assert "final_val error ___" in run.data.params and "final_val_loss" in run.data.params
    assert json.loads(run.data.tags["renamed"]) == {
        "val error (%)": "val error ___",
        "final_val error (%)": "final_val error ___",
    }
    assert "unreachable" not in err and "Traceback" not in err


# --- their data, their loaders, their paths --------------------------------------------------------------------


def test_lightnings_own_demo_classes_train_as_user_code_and_the_run_says_what_was_not_applied(tmp_path):
    demos = "lightning.pytorch.demos.boring_classes"
    args = ["--model", f"{demos}.BoringModel", "--dataset", f"{demos}.BoringDataModule", "--epochs", "2"]
    code, err, run = train(tmp_path, *args, "--train-subset", "10")
    assert code == 0, err[-3000:]
    tags, params = run.data.tags, run.data.params
    assert (params["lr_source"], params["lr_used"]) == ("module", "0.1")  # its SGD, under its StepLR
    assert history(tmp_path, run, "learning_rate") == pytest.approx([0.1, 0.01])
    assert tags["applied.batch_size"] == "1" and tags["applied.train_subset"] == "0"  # its loaders' own
    assert "batch_size=64 was not applied" in err and "train_subset=10 was not applied" in err
    assert tags["precision"] == "32-true"  # as its own Trainer would train it


def test_a_class_of_a_package_named_like_lightning_is_the_users(tmp_path, monkeypatch):
    package = tmp_path / "lightning_things"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent("""
        import lightning.pytorch as L

        class Data(L.LightningDataModule):
            def train_dataloader(self):
                return []
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from lightning_things import Data

    assert lightning_api.defines(Data, "train_dataloader")
    assert not lightning_api.defines(Data, "val_dataloader")


def test_a_module_with_its_own_dataloaders_trains_on_them_from_its_own_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # the job runs from here; the module reads data/offset.txt beside its code
    code, err, run = train(elsewhere, "--model", "theirs.RelativePath", "--code", str(CODE), "--auto-lr", "true")
    assert code == 0, err[-3000:]
    assert run.data.params["dataset"] == "module"
    assert len(history(elsewhere, run, "val_loss")) == 4
    assert run.info.artifact_uri.startswith(str(elsewhere / "mlruns")), "its artifacts where its store is, not in CODE"
    code, said, _ = train(elsewhere, "--model", "theirs.RelativePath", "--code", str(CODE), command="check")
    assert code == 0 and "on its own dataloaders" in said and "first batch (16, 8) and (16,)" in said


def test_on_small_data_the_range_test_keeps_to_its_share_of_the_fit(tmp_path):
    args = ["--model", "theirs.InHparams", "--dataset", "theirs.Points", "--code", str(CODE), "--epochs", "2"]
    code, err, run = train(tmp_path, *args, "--dataset-args", '{"samples": 256}', "--auto-lr", "true")
    assert code == 0, err[-3000:]
    summary = json.loads(Path(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").download_artifacts(
        run.info.run_id, "lr_find/summary.json", str(tmp_path))).read_text())  # fmt: skip
    assert summary["fit_steps"] == 16 and summary["lr_steps"] == 100  # 2 epochs of 8 batches; the default asked
    assert summary["steps_requested"] == 48 and summary["steps_run"] <= 48  # 8 a decade over 1e-6 .. 1: the floor
    assert "48 steps, not lr_steps=100: a range test takes at most 50% of the fit's 16 steps" in err


# --- a config LightningCLI printed --------------------------------------------------------------------------------


@requires_fashion_mnist
def test_a_config_lightningcli_printed_runs_as_it_is_and_its_params_are_what_trained(tmp_path):
    config = REPO / "examples" / "configs" / "tabular-printed.yaml"
    result = mlflow_run(
        tmp_path, "printed", f"config={config}", f"code={REPO / 'examples' / 'tabular'}", entry="config"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(f"sqlite:///{tmp_path}/mlflow.db", "printed")
    params = run.data.params
    assert params["model"] == "tabular.TabularRegressor" and params["dataset"] == "tabular.SyntheticTabular"
    assert (params["epochs"], params["optimizer"], params["lr_scheduler"]) == (
        "3",
        "torch.optim.AdamW",
        "torch.optim.lr_scheduler.StepLR",
    )
    assert json.loads(params["optimizer_args"])["lr"] == 0.003 and params["lr_used"] == "0.003"
    assert history(tmp_path, run, "learning_rate") == pytest.approx([0.003, 0.003, 0.0003])  # its StepLR


def test_what_a_config_asks_and_the_job_cannot_honour_is_refused_all_in_one_line(tmp_path):
    config = tmp_path / "conflicts.yaml"
    config.write_text("trainer:\n  strategy: ddp_spawn\n  fast_dev_run: true\n  precision: 64\nwhat_is_this: 1\n")
    code, err, run = train(tmp_path, "--config", str(config))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and run is None
    for said in ("trainer.strategy='ddp_spawn'", "trainer.fast_dev_run=True", "trainer.precision=64",
                 "what_is_this (neither"):  # fmt: skip
        assert said in lines[0], said


def test_a_configs_checkpoint_weights_and_callbacks_are_applied(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    code, err, run = train(first, "--model", "theirs.InHparams", *POINTS)
    assert code == 0, err[-3000:]
    checkpoint = MlflowClient(f"sqlite:///{first}/mlflow.db").download_artifacts(
        run.info.run_id, "checkpoints/last.ckpt", str(first)
    )
    fresh = history(first, run, "val_loss")[0]  # after one epoch from the seed's weights
    saved = tmp_path / "saved"
    callbacks = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": str(saved), "filename": "mine"}}])  # fmt: skip
    second = tmp_path / "second"
    second.mkdir()
    code, err, run = train(second, "--model", "theirs.InHparams", *POINTS, "--ckpt-path", checkpoint,
                           "--callbacks", callbacks, "--gradient-clip-val", "1.0")  # fmt: skip
    assert code == 0, err[-3000:]
    assert history(second, run, "val_loss")[0] < fresh  # one epoch from the checkpoint's weights: further on
    assert (saved / "mine.ckpt").exists()  # the config's callback ran in the fit
