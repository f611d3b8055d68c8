"""Verification of the suggestion by trial fits: which candidates and which winner (pure), then the job on small data:
a wrong suggestion corrected, the budget kept, a skip recorded, a user's own module, and two DDP processes."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mlproject import pipeline
from mlproject.config import ConfigError, JobConfig
from mlproject.finder import rules, verify
from mlproject.finder.rules import Suggestion
from mlproject.finder.verify import Trial
from mlproject.processes.ranks import Place
from mlproject.record import runconfig
from mlproject.record.tracker import RunTracker
from mlproject.session import Session
from mlproject.training import task
from mlproject.training.classpaths import add_code_path
from tests.helpers import REPO, finish, job_env, runs_of, small_job, start_job, write_dataset

CONFIDENT = Suggestion(1e-2, "combined", 1.0, "")
DOUBTFUL = Suggestion(1e-2, "combined", 0.3, "a shallow descent")


# --- pure choices ------------------------------------------------------------------------------------------------


def test_candidates_are_the_suggestion_then_half_decades_below_and_above():
    found = verify.candidates(1e-2, 5)
    expected = (1e-2, 10**-2.5, 10**-1.5, 1e-3, 1e-1)
    assert found == pytest.approx(expected)
    assert verify.candidates(1e-2, 2) == pytest.approx(expected[:2])  # an even count: the extra one below


@pytest.mark.parametrize(
    ("setting", "suggestion", "count", "why"),
    [
        ("off", CONFIDENT, 0, "lr_verify=off"),
        ("4", CONFIDENT, 4, "lr_verify=4"),
        ("3", Suggestion(1e-3, "fallback", 0.0, "flat"), 3, "lr_verify=3"),
        ("auto", Suggestion(1e-3, "fallback", 0.0, "flat curve"), 3, "no suggestion (flat curve): the fallback"),
        ("auto", CONFIDENT, 0, "confident"),
        ("auto", Suggestion(1e-2, "combined", 0.6, "steepest far below the floor"), 3, "0.60 (steepest far below"),
    ],
)
def test_how_many_candidates_and_why(setting, suggestion, count, why):
    found, reason = verify.candidate_count(setting, suggestion)
    assert found == count and why in reason


def test_auto_verifies_when_repeated_range_tests_disagree():
    count, reason = verify.candidate_count("auto", CONFIDENT, spread=0.45)
    assert count == verify.AUTO_CANDIDATES and "spread over 0.45 decades" in reason
    assert verify.candidate_count("auto", CONFIDENT, spread=0.1)[0] == 0


def test_the_budget_is_a_share_of_the_fit_for_all_candidates_together():
    count, steps, why = verify.trial_steps(3440, 0.1, 3)
    assert (count, steps, why) == (3, 114, "")
    assert 3 * steps <= 0.1 * 3440


@pytest.mark.parametrize(
    ("fit", "count", "steps"),
    [(300, 2, 37), (200, 3, 16), (100, 2, 12)],  # 75 steps: 2 of 37; 50: 3 of 16; 25: 2 of 12
)
def test_a_short_fit_drops_the_candidate_above_then_shortens_the_trials(fit, count, steps):
    kept, each, why = verify.trial_steps(fit, 0.25, 3)
    assert (kept, each) == (count, steps)
    assert why == f"; shortened to {count} candidates of {steps} steps: the fit is {fit} steps"
    plan = verify.plan("3", CONFIDENT, fit, 0.25)
    assert plan.candidates == verify.candidates(CONFIDENT.lr, count) and plan.steps == steps and not plan.skip
    assert plan.candidates[1] < plan.candidates[0], "the one kept besides the suggestion is the one below"


def test_a_fit_too_short_for_any_trial_takes_the_candidate_below_untried():
    kept, steps, why = verify.trial_steps(64, 0.25, 3)
    assert (kept, steps) == (0, 0)
    assert f"leaves 8 steps for each of 2 candidates, fewer than {verify.MIN_SHORT_TRIAL_STEPS}" in why
    plan = verify.plan("auto", DOUBTFUL, 64, 0.25)
    assert plan.lower and plan.skip == why
    assert plan.candidates == (DOUBTFUL.lr, DOUBTFUL.lr / 10**verify.SPACING_DECADES)


@pytest.mark.parametrize(("mode", "best"), [("min", 1e-3), ("max", 1e-1)])
def test_the_winner_is_the_best_score_in_the_monitors_direction(mode, best):
    trials = [Trial(1e-2, 0.5, 50, 1.0), Trial(1e-3, 0.4, 50, 1.0), Trial(1e-1, 0.9, 50, 1.0)]
    assert verify.winner(trials, mode).lr == best


def test_another_candidate_replaces_the_suggestion_only_with_a_clearly_larger_gain():
    start, gain = 2.3, 1.0  # the suggestion (tried first) gained 1.0 from the untrained value
    below = Trial(10**-2.5, start - 0.99 * verify.CLEAR_GAIN * gain, 50, 1.0)
    trials = [Trial(1e-2, start - gain, 50, 1.0), below, Trial(10**-1.5, 2.2, 50, 1.0)]
    assert verify.winner(trials, "min", start).lr == 1e-2  # better, but not clearly: a short trial's noise
    clearly = Trial(10**-2.5, start - 1.01 * verify.CLEAR_GAIN * gain, 50, 1.0)
    assert verify.winner([trials[0], clearly, trials[2]], "min", start).lr == 10**-2.5
    assert verify.winner(trials, "min").lr == 10**-2.5  # no untrained value: the better score alone
    accuracy = [Trial(1e-2, 0.30, 50, 1.0), Trial(10**-2.5, 0.11, 50, 1.0), Trial(10**-1.5, 0.70, 50, 1.0)]
    assert verify.winner(accuracy, "max", 0.10).lr == 10**-1.5  # gained 0.60 against 0.20


def test_a_verified_lr_keeps_a_range_that_peaks_at_the_lr_itself():
    lrs = list(np.geomspace(1e-4, 1e-1, 40))
    losses = [2.3 - 1.5 * i / 39 for i in range(40)]  # still falling at lr_max: the floor is the sweep's edge
    curve = rules.usable_curve(lrs, losses)
    found = rules.suggest_curve(curve, train_steps=1000)
    guarded = rules.guard_edge(found, curve, ran_to_end=True)
    assert guarded.lr_high == guarded.lr
    moved = verify.moved(guarded, 3 * guarded.lr, curve)
    assert (moved.lr_low, moved.lr_high) == pytest.approx((moved.lr / 10, moved.lr))
    deep = [2.3 - 1.5 * math.sin(math.pi * i / 39) for i in range(40)]  # a floor in the middle of the sweep
    s = rules.suggest(lrs, deep, train_steps=1000)
    assert s.lr_high > s.lr and verify.moved(s, s.lr, rules.usable_curve(lrs, deep)).lr_high > s.lr


def test_a_diverged_trial_never_wins_and_ties_keep_the_suggestion():
    trials = [Trial(1e-2, 0.5, 50, 1.0), Trial(1e-3, math.nan, 20, 0.5), Trial(1e-1, 0.5, 50, 1.0)]
    assert verify.winner(trials, "min").lr == 1e-2
    assert verify.winner([Trial(1e-2, math.nan, 10, 0.1)], "max") is None


@pytest.mark.parametrize("bad", ["1", "10", "three", "", "Auto"])
def test_lr_verify_accepts_off_auto_or_a_count(bad):
    with pytest.raises(ConfigError, match="lr_verify"):
        JobConfig(lr_verify=bad)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, math.nan])
def test_verify_fraction_is_a_share_of_the_fit(bad):
    with pytest.raises(ConfigError, match="verify_fraction"):
        JobConfig(verify_fraction=bad)


# --- the job, in this process --------------------------------------------------------------------------------

TINY = small_job(train_subset=0, val_size=200, batch_size=32, accelerator="cpu", seed=7, precision="32-true")


def run_job(tmp: Path, **changes: object) -> tuple[pipeline.JobResult, dict[str, str], Path]:
    """The job on `changes`; its params and its downloaded lr_find folder."""
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    if client.get_experiment_by_name("verify") is None:
        client.create_experiment("verify", artifact_location=str(tmp / "artifacts"))
    cfg = JobConfig.from_params(TINY).replace(**changes)
    add_code_path(cfg.code)
    tracker = RunTracker.open(uri, "", "verify")
    try:
        work = tmp / tracker.run_id
        work.mkdir()
        runconfig.log_config(tracker, cfg, "train")
        result = pipeline.run(Session(cfg, task.build(cfg), tracker, work, None, Place()))
    finally:
        tracker.end("FINISHED")
    params = client.get_run(tracker.run_id).data.params
    folder = Path(client.download_artifacts(tracker.run_id, "lr_find", str(work)))
    return result, params, folder


def trials_of(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((folder / "verify.csv").read_text())))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "images", n_train=1600, n_test=200)


def test_a_suggestion_far_too_small_is_corrected_by_verification(tmp_path, images, monkeypatch):
    """The rule is made to answer a hundredth of its LR; with five candidates (a decade either side) verification
    moves the fit up by a decade, and the fit ends better than at the wrong suggestion."""
    rule = rules.suggest_curve
    monkeypatch.setattr(rules, "suggest_curve", lambda *a, **k: _scaled(rule(*a, **k), 0.01))
    job = {"data_dir": str(images), "auto_lr": True, "schedule": "constant", "epochs": 8, "verify_fraction": 1.0}
    wrong, wrong_params, _ = run_job(tmp_path, **job, lr_verify="off")
    fixed, params, folder = run_job(tmp_path, **job, lr_verify="5")
    assert params["lr_source"] == "verified" and wrong_params["lr_source"] == "finder"
    suggested = float(params["lr_suggested"])
    assert float(params["lr_verified"]) == pytest.approx(10 * suggested, rel=1e-4)  # the largest candidate
    assert float(params["lr_used"]) == pytest.approx(float(params["lr_verified"]), rel=1e-4)
    assert [float(t["lr"]) for t in trials_of(folder) if t["chosen"] == "true"] == [float(params["lr_verified"])]
    assert fixed.final["final_val_loss"] < 0.5 * wrong.final["final_val_loss"]


def _scaled(s: Suggestion, factor: float) -> Suggestion:
    if s.method == "fallback":
        return s
    return Suggestion(s.lr * factor, s.method, s.confidence, s.reason, s.lr_low * factor, s.lr_high * factor,
                      s.candidates)  # fmt: skip


def test_the_trials_keep_to_their_share_of_the_fits_steps(tmp_path, images):
    _, params, folder = run_job(tmp_path, data_dir=str(images), epochs=6, lr_verify="3", verify_fraction=0.75)
    summary = json.loads((folder / "summary.json").read_text())
    fit_steps = summary["fit_steps"]  # 6 epochs of 1400 images at 32 a batch
    assert fit_steps == 6 * math.ceil(1400 / 32)
    trials = trials_of(folder)
    per_candidate = int(0.75 * fit_steps) // 3
    assert [int(t["steps"]) for t in trials] == [per_candidate] * 3  # steps actually run
    assert summary["verify"]["steps_run"] == 3 * per_candidate <= 0.75 * fit_steps
    assert params["lr_source"] == "verified"


def test_a_fit_too_short_to_verify_takes_the_lower_candidate_and_says_so(tmp_path, images):
    result, params, folder = run_job(tmp_path, data_dir=str(images), epochs=2, lr_verify="3", verify_fraction=0.2)
    summary = json.loads((folder / "summary.json").read_text())
    assert params["lr_verified"] == "skipped" and params["lr_source"] == "finder"
    assert summary["verify"]["ran"] is False and summary["verify"]["lowered"] is True
    assert f"fewer than {verify.MIN_SHORT_TRIAL_STEPS}" in summary["verify"]["reason"]
    assert not (folder / "verify.csv").exists()
    suggested, lower = summary["verify"]["candidates"]
    assert lower == pytest.approx(suggested / 10**verify.SPACING_DECADES)
    assert result.choice.range_test.suggestion.lr == pytest.approx(suggested)
    assert result.choice.verification.suggestion.lr == pytest.approx(lower)
    assert "taken untried" in result.choice.verification.suggestion.reason
    assert result.choice.lr == pytest.approx(float(params["lr_used"]), rel=1e-5)


TABULAR = {
    "model": "tabular.TabularRegressor",
    "dataset": "tabular.SyntheticTabular",
    "code": str(REPO / "examples" / "tabular"),
    "dataset_args": '{"samples": 3000}',
    "lr_steps": 40,
}


def test_a_users_module_is_verified_on_its_own_logged_figure_with_its_own_schedule(tmp_path):
    _, params, folder = run_job(tmp_path, **TABULAR, epochs=4, lr_verify="3", verify_fraction=1.0, monitor="val_mae")
    trials = trials_of(folder)
    assert list(trials[0]) == ["lr", "val_mae", "steps", "seconds", "chosen"]
    assert len(trials) == 3 and all(float(t["val_mae"]) > 0 for t in trials)
    start = json.loads((folder / "summary.json").read_text())["verify"]["start"]
    assert start > max(float(t["val_mae"]) for t in trials)  # every candidate learned something
    scored = [Trial(float(t["lr"]), float(t["val_mae"]), int(t["steps"]), 0.0) for t in trials]
    chosen = verify.winner(scored, "min", start)
    assert [t["chosen"] for t in trials] == ["true" if t is chosen else "false" for t in scored]
    assert float(params["lr_verified"]) == pytest.approx(chosen.lr, rel=1e-4)
    assert params["lr_source"] == "verified"
    # schedule=auto keeps the module's own StepLR, started at the verified LR
    assert float(params["lr_used"]) == pytest.approx(float(params["lr_verified"]), rel=1e-4)


def test_a_module_whose_validation_lacks_the_monitor_keeps_the_suggestion_and_says_why(tmp_path):
    _, params, folder = run_job(tmp_path, **TABULAR, epochs=4, lr_verify="3", verify_fraction=1.0, monitor="val_acc")
    summary = json.loads((folder / "summary.json").read_text())
    assert params["lr_verified"] == "skipped" and params["lr_source"] == "finder"
    assert "logs no val_acc" in summary["verify"]["reason"] and "val_loss" in summary["verify"]["reason"]


def test_two_processes_verify_in_one_ddp_world_and_choose_the_same_lr(tmp_path):
    images = write_dataset(tmp_path / "images", n_train=1200, n_test=100)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--data-dir", str(images), "--train-subset", "0", "--val-size", "200", "--batch-size", "16"]
    args += ["--epochs", "6", "--lr-steps", "20", "--auto-lr", "true", "--accelerator", "cpu", "--devices", "2"]
    args += ["--lr-verify", "3", "--verify-fraction", "1.0", "--precision", "32-true"]
    code, _, err = finish(start_job(tmp_path, "train", *args, env=job_env(uri)), 600)
    assert code == 0, err[-3000:]
    chosen = [line.split("verify: chose lr=")[1].split(":")[0] for line in err.splitlines() if "verify: chose" in line]
    assert len(chosen) == 1  # rank 0 speaks for the job; every rank takes rank 0's scores (trials.trial)
    runs = [r for r in runs_of(uri, "jobs") if "lr_verified" in r.data.params]
    assert runs
    for run in runs:
        params = run.data.params
        assert params["lr_source"] == "verified" and float(params["lr_verified"]) == pytest.approx(float(chosen[0]))
        assert run.data.tags["world_size"] == "2"
