"""`lr-finder report`: the markdown table of an experiment's runs, from real runs in a real sqlite store."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from service import report
from service.cli import cli

START_MS = itertools.count(1_790_000_000_000, 1000)
STUDY = [("lr=1e-05", "fixed", "1e-05", None, 0.412), ("lr=0.1", "fixed", "0.1", None, 0.781)]
STUDY += [("lr=finder", "finder", "0.00396", "0.00151", 0.902), ("lr=0.0001", "fixed", "0.0001", None, 0.733)]


def log_run(client: MlflowClient, exp: str, name: str, params: dict[str, str], metrics: dict[str, float], **tags):
    """A run started one second after the previous one, so the order the table shows is the order made here."""
    run = client.create_run(exp, start_time=next(START_MS), run_name=name, tags=tags)
    client.log_batch(
        run.info.run_id,
        params=[Param(k, v) for k, v in params.items()],
        metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
    )
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A study (a parent with four child runs, one LR each), a failed run and a run named with a pipe."""
    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("study", artifact_location=str(tmp / "artifacts"))
    client.create_experiment("other", artifact_location=str(tmp / "artifacts-other"))
    parent = log_run(client, exp, "compare", {"study": "four-lr"}, {})
    for name, source, used, suggested, acc in STUDY:
        params = {"lr_source": source, "lr_used": used, "test_acc": str(acc)}
        if suggested:
            params["lr_suggested"] = suggested
        child = log_run(client, exp, name, params, {"test_acc": acc}, **{report.PARENT_TAG: parent})
        client.set_terminated(child, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    failed = log_run(client, exp, "bad|run", {"lr_source": "fixed", "lr_used": "1"}, {})
    client.set_terminated(failed, "FAILED")
    return uri


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| run ")]


def test_study_is_the_parent_then_its_four_child_runs_with_their_lr_choice(store):
    rows = report.rows(report.experiment_runs(store, "study"))
    assert [r.name for r in rows] == ["compare", *(s[0] for s in STUDY), "bad|run"]
    assert [r.depth for r in rows] == [0, 1, 1, 1, 1, 0]
    finder = rows[3]
    assert (finder.lr_source, finder.lr_used, finder.lr_suggested, finder.test_acc) == (
        "finder",
        0.00396,
        0.00151,
        0.902,
    )


def test_markdown_table_has_the_columns_the_values_and_the_best_run_in_bold(store):
    text = report.render("study", report.rows(report.experiment_runs(store, "study")), "http://127.0.0.1:5000/")
    assert "| run | lr_source | lr_used | lr_suggested | test_acc | status | link |" in text
    assert "Best: **lr=finder**, test_acc 0.9020 at lr_used 0.00396" in text
    lines = table_lines(text)
    assert len(lines) == 6
    assert lines[3].startswith("| ↳ lr=finder | finder | 0.00396 | 0.00151 | **0.9020** | FINISHED | [open](http://")
    assert lines[1].startswith("| ↳ lr=1e-05 | fixed | 1e-05 | - | 0.4120 | FINISHED |")
    assert "/#/experiments/" in lines[3] and "/runs/" in lines[3] and "5000//#" not in lines[3]


def test_failed_run_shows_dashes_and_its_status_and_a_pipe_in_a_name_keeps_the_row(store):
    lines = table_lines(report.render("study", report.rows(report.experiment_runs(store, "study"))))
    failed = lines[-1]
    assert failed.startswith("| bad\\|run | fixed | 1 | - | - | FAILED | `")
    assert failed.replace("\\|", "").count("|") == 8  # seven cells


def test_cli_prints_the_table_with_run_ids_for_a_database_uri(store):
    result = CliRunner().invoke(cli, ["report", "--experiment", "study", "--tracking-uri", store])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("### Experiment study: 6 runs, 4 finished with test_acc")
    assert "[open](" not in result.output  # a database has no UI to link to


def test_cli_links_runs_to_the_ui_url_when_given(store):
    args = ["report", "--experiment", "study", "--tracking-uri", store, "--ui-url", "http://mlflow.team:5000"]
    result = CliRunner().invoke(cli, args)
    assert result.output.count("[open](http://mlflow.team:5000/#/experiments/") == 6


def test_cli_names_the_experiments_there_are_when_one_is_missing(store):
    result = CliRunner().invoke(cli, ["report", "--experiment", "studdy", "--tracking-uri", store])
    assert result.exit_code == 1
    assert "no experiment 'studdy'" in result.output and "Default, other, study" in result.output


def test_cli_refuses_a_database_file_that_does_not_exist(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/nothing.db"
    result = CliRunner().invoke(cli, ["report", "--experiment", "study", "--tracking-uri", uri])
    assert result.exit_code == 1 and "no database at" in result.output
    assert not (tmp_path / "nothing.db").exists()


def test_names_and_params_cannot_inject_markup_into_the_summary(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("x", artifact_location=str(tmp_path / "artifacts"))
    hostile = "<img src=x onerror=alert(1)> [click](javascript:alert(1)) **bold**\nnext"
    log_run(client, exp, hostile, {"lr_source": "<script>x</script>", "lr_used": "0.1"}, {"test_acc": 0.5})
    text = report.render("x", report.rows(report.experiment_runs(uri, "x")))
    (row,) = table_lines(text)
    assert "<img" not in text and "<script>" not in text and "**bold**" not in text
    assert not re.search(r"(?<!\\)\]\(", text), "an unescaped link"
    assert "&lt;img src=x onerror=alert(1)&gt; \\[click\\](javascript:alert(1)) \\*\\*bold\\*\\* next" in row
