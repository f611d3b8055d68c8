"""`lr-finder report`: the markdown table of an experiment's runs, from real runs in a real sqlite store."""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from service import report, report_options, report_table
from service.cli import cli

START_MS = itertools.count(1_790_000_000_000, 1000)
STUDY = [("lr=1e-05", "fixed", "1e-05", None, 0.412), ("lr=0.1", "fixed", "0.1", None, 0.781)]
STUDY += [("lr=finder", "finder", "0.00396", "0.00151", 0.902), ("lr=0.0001", "fixed", "0.0001", None, 0.733)]
# The lowest val_loss is not the best test_acc's run: ranking by it picks another.
VAL_LOSS = {"lr=1e-05": 1.61, "lr=0.1": 0.402, "lr=finder": 0.431, "lr=0.0001": 0.77}


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
        metrics = {"test_acc": acc, "val_loss": VAL_LOSS[name]}
        child = log_run(client, exp, name, params, metrics, **{report_table.PARENT_TAG: parent})
        client.set_terminated(child, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    failed = log_run(client, exp, "bad|run", {"lr_source": "fixed", "lr_used": "1"}, {})
    client.set_terminated(failed, "FAILED")
    return uri


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| run ")]


def test_study_is_the_parent_then_its_four_child_runs_with_their_lr_choice(store):
    rows = report_table.rows(report.fetch(store, "study").runs)
    assert [r.name for r in rows] == ["compare", *(s[0] for s in STUDY), "bad|run"]
    assert [r.depth for r in rows] == [0, 1, 1, 1, 1, 0]
    finder = rows[3]
    assert (finder.lr_source, finder.lr_used, finder.lr_suggested, finder.score) == (
        "finder",
        0.00396,
        0.00151,
        0.902,
    )


def test_markdown_table_has_the_columns_the_values_and_the_best_run_in_bold(store):
    text = report_table.render("study", report_table.rows(report.fetch(store, "study").runs), "http://127.0.0.1:5000/")
    assert "| run | lr_source | lr_used | lr_suggested | test\\_acc | status | link |" in text  # a user's name: escaped
    assert "Best: **lr=finder**, test\\_acc 0.9020 at lr_used 0.00396" in text
    lines = table_lines(text)
    assert len(lines) == 6
    assert lines[3].startswith("| ↳ lr=finder | finder | 0.00396 | 0.00151 | **0.9020** | FINISHED | [open](http://")
    assert lines[1].startswith("| ↳ lr=1e-05 | fixed | 1e-05 | - | 0.4120 | FINISHED |")
    assert "/#/experiments/" in lines[3] and "/runs/" in lines[3] and "5000//#" not in lines[3]


def test_failed_run_shows_dashes_and_its_status_and_a_pipe_in_a_name_keeps_the_row(store):
    lines = table_lines(report_table.render("study", report_table.rows(report.fetch(store, "study").runs)))
    failed = lines[-1]
    assert failed.startswith("| bad\\|run | fixed | 1 | - | - | FAILED | `")
    assert failed.replace("\\|", "").count("|") == 8  # seven cells


def test_cli_prints_the_table_with_run_ids_for_a_database_uri(store):
    result = CliRunner().invoke(cli, ["report", "--experiment", "study", "--tracking-uri", store])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("### Experiment study: 6 runs, 4 finished with test\\_acc")
    assert "[open](" not in result.output  # a database has no UI to link to


def test_cli_links_runs_to_the_ui_url_when_given(store):
    args = ["report", "--experiment", "study", "--tracking-uri", store, "--ui-url", "http://mlflow.team:5000"]
    result = CliRunner().invoke(cli, args)
    assert result.output.count("[open](http://mlflow.team:5000/#/experiments/") == 6


@pytest.mark.parametrize(
    "ui_url, tracking_uri, base",
    [
        ("", "https://ci:s3cret@mlflow.team/", "https://mlflow.team/"),
        ("", "https://mlflow.team:5000/?token=s3cret", "https://mlflow.team:5000/"),
        ("", "sqlite:///mlflow.db", ""),
        ("http://ui.team", "https://ci:s3cret@mlflow.team", "http://ui.team"),
    ],
)
def test_links_fall_back_to_the_tracking_server_without_its_credentials(ui_url, tracking_uri, base):
    assert report_options.link_base(ui_url, tracking_uri) == base


def test_a_host_install_without_sqlalchemy_reads_no_database_and_says_which_extra(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # as in `pip install -c constraints.txt .`
    result = CliRunner().invoke(cli, ["report", "--experiment", "study", "--tracking-uri", store])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: reading the database {store} needs SQLAlchemy; the host install reads tracking servers only:"
        " pip install 'lr-finder[server]'"
    ]


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
    text = report_table.render("x", report_table.rows(report.fetch(uri, "x").runs))
    (row,) = table_lines(text)
    assert "<img" not in text and "<script>" not in text and "**bold**" not in text
    assert not re.search(r"(?<!\\)\]\(", text), "an unescaped link"
    assert "&lt;img src=x onerror=alert(1)&gt; \\[click\\](javascript:alert(1)) \\*\\*bold\\*\\* next" in row


def run_named(uri: str, name: str) -> str:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, f"attributes.run_name = '{name}'")
    return run.info.run_id


def test_parent_shows_only_that_study_the_parent_then_its_child_runs(store):
    parent = run_named(store, "compare")
    result = CliRunner().invoke(cli, ["report", "--parent", parent, "--tracking-uri", store])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("### Study compare in experiment study: 5 runs, 4 finished with test\\_acc")
    names = [line.split(" | ")[0].removeprefix("| ") for line in table_lines(result.output)]
    assert names == ["compare", *(f"↳ {s[0]}" for s in STUDY)]  # not bad|run, which is no part of it
    same = CliRunner().invoke(cli, ["report", "--parent", parent, "--experiment", "study", "--tracking-uri", store])
    assert same.output == result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--parent", "0" * 32], "no run 00000000000000000000000000000000 at sqlite:///"),
        (["--parent", "PARENT", "--experiment", "other"], "is in experiment 'study', not 'other': drop --experiment"),
    ],
)
def test_parent_that_is_not_there_or_elsewhere_is_one_line(store, args, message):
    args = [run_named(store, "compare") if a == "PARENT" else a for a in args]
    result = CliRunner().invoke(cli, ["report", *args, "--tracking-uri", store])
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith("Error: ") and message in line


def test_ranked_by_val_loss_with_mode_min_bolds_the_lowest(store):
    args = ["report", "--experiment", "study", "--tracking-uri", store, "--ranked-by", "val_loss", "--mode", "min"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "4 finished with val\\_loss" in result.output
    assert "Best: **lr=0.1**, val\\_loss 0.4020 at lr_used 0.1" in result.output
    assert "| run | lr_source | lr_used | lr_suggested | val\\_loss | status | link |" in result.output
    lines = table_lines(result.output)
    assert [line for line in lines if "**" in line] == [next(line for line in lines if "↳ lr=0.1 |" in line)]
    assert "| **0.4020** |" in lines[2] and "| 1.6100 |" in lines[1]


@pytest.mark.parametrize(
    "args, option",
    [
        (["--ranked-by", ""], "--ranked-by"),
        (["--ranked-by", "acc|x"], "--ranked-by"),
        (["--mode", "lowest"], "--mode"),
        (["--parent", "a b"], "--parent"),
        (["--experiment", " "], "--experiment"),
        (["--ui-url", "javascript:alert(1)"], "--ui-url"),
    ],
)
def test_bad_options_are_a_usage_error_naming_the_option(store, args, option):
    result = CliRunner().invoke(cli, ["report", "--experiment", "study", "--tracking-uri", store, *args])
    assert result.exit_code == 2
    (error,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert f"'{option}'" in error


def test_neither_experiment_nor_parent_is_a_usage_error(store):
    result = CliRunner().invoke(cli, ["report", "--tracking-uri", store])
    assert result.exit_code == 2 and "Error: give --experiment NAME, or --parent RUN_ID for one study" in result.output


def test_every_page_of_runs_is_read(store, monkeypatch):
    monkeypatch.setattr(report, "PAGE", 2)  # 6 runs: three pages
    assert len(report.fetch(store, "study").runs) == 6
    assert len(report.fetch(store, parent=run_named(store, "compare")).runs) == 5


def test_a_metric_that_is_not_a_number_ranks_no_run(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("x", artifact_location=str(tmp_path / "artifacts"))
    for name, acc in (("nan", float("nan")), ("real", 0.5), ("nan too", float("nan"))):
        client.set_terminated(log_run(client, exp, name, {"lr_used": "0.1"}, {"test_acc": acc}), "FINISHED")
    table = report_table.rows(report.fetch(uri, "x").runs)
    assert [r.score for r in table] == [None, 0.5, None]  # MLflow stores a NaN as it came
    assert report_table.best(table).name == "real" and report_table.best(table, "min").name == "real"


def test_a_deleted_experiment_is_one_line_saying_how_to_restore_it(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("gone", artifact_location=str(tmp_path / "artifacts"))
    log_run(client, exp, "r", {}, {})
    client.delete_experiment(exp)
    result = CliRunner().invoke(cli, ["report", "--experiment", "gone", "--tracking-uri", uri])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: experiment 'gone' at {uri} is deleted: restore it"
        f" (mlflow experiments restore --experiment-id {exp}) or report another\n"
    )


def test_a_metric_name_cannot_inject_markup():
    row = report_table.ReportRow("r", "id", "1", 0, "", None, None, 0.5, "FINISHED")
    text = report_table.render("x", [row], ranking=report_table.Ranking("<b>|x", "max"))
    assert "<b>" not in text and "&lt;b&gt;\\|x" in text
