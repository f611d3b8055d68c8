"""Bad input: a non-zero exit and one line on stderr naming the parameter, before any training starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

BAD = [
    (["--lr", "abc"], "lr"),
    (["--lr", "-1"], "lr"),
    (["--lr", "nan"], "lr"),
    (["--lr", "inf"], "lr"),
    (["--lr", ""], "lr"),
    (["--lr", "é"], "lr"),
    (["--lr-min", "1", "--lr-max", "0.1"], "lr_min"),
    (["--lr-min", "0.1", "--lr-max", "0.1"], "lr_min"),
    (["--lr-min", "0.00999999", "--lr-max", "0.01"], "lr_min"),
    (["--lr-max", "-inf"], "lr_max"),
    (["--epochs", "0"], "epochs"),
    (["--epochs", "-3"], "epochs"),
    (["--epochs", "2.5"], "epochs"),
    (["--epochs", "99999999"], "epochs"),
    (["--batch-size", "0"], "batch_size"),
    (["--batch-size", "100000000"], "batch_size"),
    (["--lr-steps", "2"], "lr_steps"),
    (["--seed", "-1"], "seed"),
    (["--train-subset", "-5"], "train_subset"),
    (["--val-size", "0"], "val_size"),
    (["--devices", "0"], "devices"),
    (["--optimizer", "adagrad"], "optimizer"),
    (["--optimizer", ""], "optimizer"),
    (["--schedule", "linear"], "schedule"),
    (["--model", "resnet"], "model"),
    (["--dataset", "cifar10"], "dataset"),
    (["--lr-method", "magic"], "lr_method"),
    (["--accelerator", "tpu"], "accelerator"),
    (["--precision", "8-bit"], "precision"),
    (["--data-mode", "disk"], "data_mode"),
    (["--auto-lr", "ture"], "auto_lr"),
    (["--auto-lr", ""], "auto_lr"),
    (["--accelerator", "cpu", "--precision", "16-mixed"], "precision"),
    (["--register-model", "team/fashion"], "register_model"),  # MLflow refuses it, after training: refused before
    (["--register-model", "..fashion"], "register_model"),
]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_RUN_ID": "", "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "mlproject", *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.parametrize("args, param", BAD, ids=[" ".join(a) or "empty" for a, _ in BAD])
def test_bad_parameter_exits_2_with_one_line_naming_it(args, param, tmp_path):
    result = run_cli("train", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: invalid value for {param}: ") and "; expected " in lines[0], lines[0]


def test_unknown_option_is_a_usage_error(tmp_path):
    result = run_cli("train", "--learning-rate", "0.1", cwd=tmp_path)
    assert result.returncode == 2
    assert "--learning-rate" in result.stderr


def test_missing_data_dir_names_the_folder_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_cli("train", "--data-dir", str(missing), cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(missing) in last and "data_dir" in last
