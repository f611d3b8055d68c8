"""The user's own model and data through the same job: the examples' LightningModules and data modules, an image
folder, a LightningCLI config and a module this project has never seen, each with the whole run contract; and
every mistake a user can make in naming them, as one line and a FAILED run."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.helpers import REPO, artifact_paths, finish, job_env, mlflow_run, runs_of, start_job

TABULAR = ["model=tabular.TabularRegressor", "dataset=tabular.SyntheticTabular", f"code={REPO / 'examples/tabular'}"]
SEQUENCE = ["model=sequence.GRUClassifier", "dataset=sequence.MajorityTokens", f"code={REPO / 'examples/sequence'}"]
FAST_SWEEP = ["lr_steps=40", "auto_lr=true"]


def only_run(tmp: Path, experiment: str):
    (run,) = runs_of(f"sqlite:///{tmp}/mlflow.db", experiment)
    return run, MlflowClient(f"sqlite:///{tmp}/mlflow.db")


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def logged_model(tmp: Path, run) -> object:
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [run.info.run_id]
    return mlflow.pyfunc.load_model(models[0].model_uri)


def assert_range_test_artifacts(client: MlflowClient, run) -> dict:
    paths = artifact_paths(client, run.info.run_id)
    assert {"config.json", "lr_find/loss_vs_lr.png", "lr_find/curve.csv", "lr_find/summary.json"} <= paths
    local = client.download_artifacts(run.info.run_id, "lr_find/summary.json")
    summary = json.loads(Path(local).read_text())
    assert summary["suggestion"] == pytest.approx(float(run.data.params["lr_suggested"]), rel=1e-3)
    return summary


# --- the examples through `mlflow run` -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tabular_regression_module_and_data_module_fulfil_the_run_contract(tmp_path):
    args = [*TABULAR, *FAST_SWEEP, "epochs=3", 'model_args={"step_size": 1}', 'dataset_args={"samples": 2000}']
    result = mlflow_run(tmp_path, "tabular", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    run, client = only_run(tmp_path, "tabular")
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and params["lr_source"] == "finder"
    for key in ("final_val_loss", "final_val_mae", "test_loss", "test_mae"):
        assert float(params[key]) > 0, key
    assert metrics["test_mae"] == pytest.approx(float(params["test_mae"]), abs=1e-4)
    for key in ("val_loss", "val_mae", "train_loss", "learning_rate", "epoch_seconds"):
        assert steps(client, run.info.run_id, key) == [0, 1, 2], key
    # schedule=auto keeps the module's own StepLR (step_size 1, gamma 0.5), started at the LR the range test chose
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "learning_rate")]
    used = float(params["lr_used"])
    assert lrs == pytest.approx([used, used / 2, used / 4], rel=1e-4)
    assert tags["lightning_package"] == "lightning.pytorch"
    assert_range_test_artifacts(client, run)
    model = logged_model(tmp_path, run)
    assert model.metadata.signature is not None
    assert np.asarray(model.predict(np.zeros((3, 16), dtype=np.float32))).shape == (3,)


@pytest.mark.slow
def test_a_sequence_model_with_its_lr_in_hparams_ranks_by_its_own_monitor(tmp_path):
    args = [*SEQUENCE, *FAST_SWEEP, "epochs=1", 'dataset_args={"samples": 2000}', "monitor=val_acc"]
    result = mlflow_run(tmp_path, "sequence", *args, "monitor_mode=max")
    assert result.returncode == 0, result.stderr[-3000:]
    run, client = only_run(tmp_path, "sequence")
    params = run.data.params
    assert run.info.status == "FINISHED" and params["lr_source"] == "finder"
    assert {"final_val_acc", "final_val_loss", "test_acc", "test_loss"} <= set(params)
    assert steps(client, run.info.run_id, "val_acc") == [0]
    assert run.data.tags["lightning_package"] == "pytorch_lightning"
    summary = assert_range_test_artifacts(client, run)
    assert summary["fit_steps"] == 25  # 1,600 training sequences at 64 a batch, one epoch: from the data module
    assert logged_model(tmp_path, run).metadata.signature is not None


def write_image_folder(root: Path, classes: int = 3, per_class: int = 40, rgb: bool = True) -> Path:
    """PNG files of different sizes, RGB and grayscale mixed (or grayscale only); a class is a colour band."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", per_class // 4)):
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                side = int(rng.integers(24, 48))
                pixels = rng.integers(0, 80, (side, side, 3), dtype=np.uint8)
                pixels[k * side // classes : (k + 1) * side // classes, :, k % 3] = 255
                image = Image.fromarray(pixels)
                if not rgb or i % 3 == 0:
                    image = image.convert("L")
                image.save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_an_image_folder_trains_a_torchvision_network_with_no_code_at_all(tmp_path):
    folder = write_image_folder(tmp_path / "images")
    args = ["dataset=imagefolder", f"data_dir={folder}", "model=resnet18", "image_size=32", "val_size=24"]
    result = mlflow_run(tmp_path, "images", *args, *FAST_SWEEP, "epochs=1", "augment=true")
    assert result.returncode == 0, result.stderr[-3000:]
    run, client = only_run(tmp_path, "images")
    params = run.data.params
    assert run.info.status == "FINISHED" and params["lr_source"] in ("finder", "fallback")
    assert {"final_val_acc", "final_val_loss", "test_acc", "test_loss"} <= set(params)
    contexts = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(contexts) == {"training", "validation", "test"}
    assert json.loads(contexts["validation"].profile)["features_shape"][0] == 24  # the seeded hold-out
    model = logged_model(tmp_path, run)
    assert tuple(model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3, 32, 32)


@pytest.mark.slow
def test_a_lightning_cli_config_runs_as_it_is_and_explicit_values_win(tmp_path):
    config = REPO / "examples" / "configs" / "tabular.yaml"
    code = f"code={REPO / 'examples/tabular'}"
    result = mlflow_run(tmp_path, "config", f"config={config}", code, "lr_steps=30")
    assert result.returncode == 0, result.stderr[-3000:]
    run, client = only_run(tmp_path, "config")
    assert steps(client, run.info.run_id, "val_loss") == [0, 1, 2]  # trainer.max_epochs: 3
    assert "lr_suggested" in run.data.params  # auto_lr: true, a job parameter in the file
    resolved = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json")).read_text())
    assert (resolved["model"], resolved["seed"], resolved["epochs"]) == ("tabular.TabularRegressor", "7", "3")
    assert json.loads(resolved["model_args"]) == {"features": 16, "hidden": 64, "lr": 0.001}
    assert run.data.tags["config.epochs"] == "3"  # MLflow logged the command line's 4; the file's value is a tag

    result = mlflow_run(tmp_path, "explicit", f"config={config}", code, "lr_steps=30", "epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    run, client = only_run(tmp_path, "explicit")
    assert steps(client, run.info.run_id, "val_loss") == [0, 1]


NEVER_SEEN = '''
    """Written the way Lightning's documentation writes a first model: an autoencoder on random points."""
    import lightning as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset


    class LitAutoEncoder(L.LightningModule):
        def __init__(self, learning_rate=1e-3):
            super().__init__()
            self.save_hyperparameters()
            self.encoder = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 3))
            self.decoder = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 32))

        def forward(self, x):
            return self.decoder(self.encoder(x))

        def training_step(self, batch, batch_idx):
            (x,) = batch
            loss = nn.functional.mse_loss(self(x), x)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            (x,) = batch
            self.log("val_loss", nn.functional.mse_loss(self(x), x))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)


    class RandomPoints(L.LightningDataModule):
        def setup(self, stage):
            data = torch.randn(1200, 32, generator=torch.Generator().manual_seed(1))
            self.train_set, self.val_set = TensorDataset(data[:1000]), TensorDataset(data[1000:])

        def train_dataloader(self):
            return DataLoader(self.train_set, batch_size=32, shuffle=True)

        def val_dataloader(self):
            return DataLoader(self.val_set, batch_size=100)
'''


@pytest.mark.slow
def test_a_module_written_elsewhere_runs_through_the_documented_command(tmp_path):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "autoencoder.py").write_text(textwrap.dedent(NEVER_SEEN))
    args = ["model=autoencoder.LitAutoEncoder", "dataset=autoencoder.RandomPoints", f"code={tmp_path / 'theirs'}"]
    result = mlflow_run(tmp_path, "theirs", *args, *FAST_SWEEP, "epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    run, client = only_run(tmp_path, "theirs")
    assert run.info.status == "FINISHED"
    assert {"lr_suggested", "lr_used", "lr_source", "final_val_loss"} <= set(run.data.params)
    assert "test_loss" not in run.data.params  # it defines no test loop: nothing is made up
    assert steps(client, run.info.run_id, "val_loss") == [0, 1]
    assert steps(client, run.info.run_id, "train_loss") == [0, 1]  # logged per step only: each epoch's mean
    assert_range_test_artifacts(client, run)
    logged_model(tmp_path, run)


# --- mistakes --------------------------------------------------------------------------------------------------

BROKEN = """
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset


    class NoLR(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)


    class WithLR(NoLR):
        lr = 0.01

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)


    class ReturnsNothing(WithLR):
        def training_step(self, batch, batch_idx):
            self.layer(batch[0]).sum()


    class ReturnsAVector(WithLR):
        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2)


    class Points(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(256, 4)), batch_size=16)


    class NoTrainLoader(pl.LightningDataModule):
        pass


    class NotAModule:
        pass
"""


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "broken.py").write_text(textwrap.dedent(BROKEN))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "keys.yaml").write_text("model: {class_path: broken.NoLR}\nnot_a_job_parameter: 1\n")
    # A billion laughs: nine levels of nine aliases each, a few hundred bytes that expand to 9^9 values
    laughs = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    (tmp_path / "laughs.yaml").write_text("\n".join(laughs) + "\n")
    (tmp_path / "itself.yaml").write_text("model: &m\n  class_path: broken.NoLR\n  init_args: {inner: *m}\n")
    (tmp_path / "binary.yaml").write_bytes(b"model: \xff\xfe\n")
    return tmp_path


TABULAR_OPTIONS = ["--model", "tabular.TabularRegressor", "--dataset", "tabular.SyntheticTabular"]
TABULAR_OPTIONS += ["--code", str(REPO / "examples/tabular")]
MISTAKES = [
    (["--model", "nosuchpkg.Net"], "model", "No module named 'nosuchpkg'"),
    (["--model", "tabular.NoSuchClass", "--code", str(REPO / "examples/tabular")], "model", "no class NoSuchClass"),
    (["--model", "broken.NotAModule", "--code", "{tmp}/broken"], "model", "a LightningModule subclass"),
    ([*TABULAR_OPTIONS[:2], "--dataset", "tabular.TabularRegressor", *TABULAR_OPTIONS[4:]], "dataset", "DataModule"),
    ([*TABULAR_OPTIONS, "--model-args", "[1, 2]"], "model_args", "a JSON object"),
    ([*TABULAR_OPTIONS, "--model-args", "{nope"], "model_args", "a JSON object"),
    ([*TABULAR_OPTIONS, "--model-args", '{"nope": 1}'], "model_args", "unexpected keyword argument 'nope'"),
    ([*TABULAR_OPTIONS, "--dataset-args", '{"rows": 5}'], "dataset_args", "unexpected keyword argument 'rows'"),
    (["--model", "lenet", "--model-args", '{"hidden": 5}'], "model_args", "{} for the built-in network lenet"),
    (["--config", "{tmp}/missing.yaml"], "config", "a readable YAML file"),
    (["--config", "{tmp}/list.yaml"], "config", "a mapping in LightningCLI's format"),
    (["--config", "{tmp}/laughs.yaml"], "config", "at most 100,000 values with its aliases expanded"),
    (["--config", "{tmp}/itself.yaml"], "config", "at most 100,000 values with its aliases expanded"),
    (["--config", "/dev/zero"], "config", "a YAML file of at most 1 MB"),
    (["--config", "{tmp}/binary.yaml"], "config", "a YAML file of UTF-8 text (byte 7 is not)"),
    (["--config", "{tmp}/keys.yaml", "--code", "{tmp}/broken"], "config", "not_a_job_parameter (neither"),
    (["--code", "{tmp}/nowhere"], "code", "an existing folder"),
    (
        ["--model", "broken.NoLR", "--dataset", "broken.Points", "--code", "{tmp}/broken", "--auto-lr", "true"],
        "lr_attr",
        "tried lr, learning_rate",
    ),
    (
        ["--model", "broken.NoLR", "--dataset", "broken.NoTrainLoader", "--code", "{tmp}/broken"],
        "dataset",
        "train_dataloader",
    ),
    (["--model", "resnet9000"], "model", "torchvision's"),
    (["--dataset", "imagefolder"], "data_dir", "the image folder"),
]


@pytest.mark.parametrize("args, param, detail", MISTAKES, ids=[m[1] + ":" + m[2][:24] for m in MISTAKES])
def test_a_mistake_in_naming_the_model_or_data_is_one_line_exit_2_before_any_run(broken, args, param, detail):
    args = [a.replace("{tmp}", str(broken)) for a in args]
    code, _, err = finish(start_job(broken, "train", *args, env=job_env(f"sqlite:///{broken}/mlflow.db")), 300)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"error: invalid value for {param}: ") and detail in lines[0], lines[0]
    assert runs_of(f"sqlite:///{broken}/mlflow.db", "jobs") == []  # no run was started for it


@pytest.mark.parametrize("model", ["broken.ReturnsNothing", "broken.ReturnsAVector"])
@pytest.mark.parametrize("auto_lr", ["true", "false"], ids=["in the range test", "in the fit"])
def test_a_training_step_that_breaks_the_contract_fails_the_run_with_the_reason(broken, model, auto_lr):
    uri = f"sqlite:///{broken}/mlflow.db"
    args = ["--model", model, "--dataset", "broken.Points", "--code", f"{broken}/broken", "--auto-lr", auto_lr]
    code, _, err = finish(start_job(broken, "train", *args, "--epochs", "1", env=job_env(uri)), 300)
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: "), err[-3000:]
    said = model.split(".")[1] + ".training_step returned"
    assert said in err.strip().splitlines()[-1]
    assert ("(16, 1)" in err) == ("Vector" in model) and ("loss" in err)
    (run,) = runs_of(uri, "jobs")
    assert run.info.status == "FAILED"
    assert said in Path(MlflowClient(uri).download_artifacts(run.info.run_id, "error.txt")).read_text()


@pytest.mark.slow
def test_a_mistake_under_mlflow_run_ends_the_run_failed_with_error_txt(tmp_path):
    result = mlflow_run(tmp_path, "mistake", "model=nosuchpkg.Net")
    assert result.returncode != 0
    assert "error: invalid value for model: 'nosuchpkg.Net'" in result.stderr
    run, client = only_run(tmp_path, "mistake")
    assert run.info.status == "FAILED"
    assert "No module named 'nosuchpkg'" in Path(client.download_artifacts(run.info.run_id, "error.txt")).read_text()


def test_check_says_what_the_job_would_train_without_training_or_tracking(broken, tmp_path):
    env = job_env(f"sqlite:///{tmp_path}/never.db")
    code, out, err = finish(start_job(tmp_path, "check", *TABULAR_OPTIONS, env=env), 120)
    assert code == 0 and out.strip() == (
        "ok: model tabular.TabularRegressor (LightningModule) on tabular.SyntheticTabular (LightningDataModule); LR "
        "set at its attribute `lr` (its own: 0.001); first batch (64, 16) and (64,)"
    ), err
    folder = write_image_folder(tmp_path / "images", per_class=8)
    code, out, _ = finish(start_job(tmp_path, "check", "--dataset", "imagefolder", "--data-dir", str(folder),
                                    env=env), 120)  # fmt: skip
    assert code == 0 and f"on the image folder {folder}" in out and ", 3, 64, 64) and (" in out  # RGB, 64 a side
    code, _, err = finish(start_job(tmp_path, "check", "--model", "broken.NotAModule", "--code", f"{broken}/broken",
                                    env=env), 120)  # fmt: skip
    assert code == 2 and "a LightningModule subclass" in err
    assert not (tmp_path / "never.db").exists()
