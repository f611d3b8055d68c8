"""User code that calls sys.exit inside the job, at import or mid-fit, with 0, a number or a message: the job did
not end, so it failed: one line naming where, exit 1, and under `mlflow run` a FAILED run (never "succeeded")."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import finish, job_env, mlflow_run, runs_of, start_job

QUITS = """
    import os
    import sys

    import lightning.pytorch as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    WHEN, CODE = os.environ.get("QUIT_WHEN", ""), os.environ.get("QUIT_CODE", "0")
    CODE = int(CODE) if CODE.lstrip("-").isdigit() else CODE


    def quit_now():
        sys.exit(CODE)


    if WHEN == "import":
        quit_now()


    class Quits(L.LightningModule):
        def __init__(self, lr: float = 0.01):
            super().__init__()
            self.lr, self.net = lr, torch.nn.Linear(8, 1)

        def _loss(self, batch):
            (x,) = batch
            return ((self.net(x) - x.sum(1, keepdim=True)) ** 2).mean()

        def training_step(self, batch, batch_idx):
            if WHEN == "epoch 2" and self.current_epoch == 1:
                quit_now()
            loss = self._loss(batch)
            self.log("train_loss", loss, on_epoch=True)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self._loss(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(256, 8, generator=torch.Generator().manual_seed(0))), 32)

        def val_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(64, 8, generator=torch.Generator().manual_seed(1))), 64)
"""
PARAMS = ["model=quits.Quits", "dataset=module", "epochs=3"]


@pytest.fixture
def code(tmp_path: Path) -> Path:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "quits.py").write_text(textwrap.dedent(QUITS))
    return folder


def test_sys_exit_0_in_training_step_fails_the_mlflow_run_instead_of_finishing_it_early(tmp_path, code):
    result = mlflow_run(tmp_path, "quits", *PARAMS, f"code={code}", env={"QUIT_WHEN": "epoch 2"})
    assert result.returncode != 0
    assert "error: the job's code called sys.exit(0) in quit_now (" in result.stderr
    assert "quits.py:" in result.stderr and "the job failed" in result.stderr
    (run,) = runs_of(f"sqlite:///{tmp_path}/mlflow.db", "quits")
    assert run.info.status == "FAILED"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [0], "one epoch of three"
    error = Path(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert "called sys.exit(0) in quit_now" in error


@pytest.mark.parametrize(("exit_code", "shown"), [("0", "0"), ("3", "3"), ("stop here", "'stop here'")])
def test_sys_exit_at_import_is_one_line_and_exit_1_whatever_its_code(tmp_path, code, exit_code, shown):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = job_env(uri, QUIT_WHEN="import", QUIT_CODE=exit_code)
    args = ["--model", "quits.Quits", "--dataset", "module", "--code", str(code)]
    status, _, err = finish(start_job(tmp_path, "train", *args, env=env))
    assert status == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: the job's code called sys.exit({shown}) in quit_now (")
    assert "Traceback" not in err
