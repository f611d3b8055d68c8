"""What `lr-finder run|doctor|build` decide before docker is involved: the launch spec, the checks, the summary,
and the one-line refusals of the command line. No Docker engine needed."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from mlproject.logs import LEVEL_ENV
from mlproject.record.environment import run_url
from service import job_args, probes, progress, run_outputs, spec
from service.cli import cli
from service.container_options import plan
from tests.helpers import write_tiny_image_folder

RUN_LOG = (
    "2026/11/28 21:09:58 INFO mlflow.projects.backend.local: === Running command 'python -m mlproject train "
    "--lr abc' in run with ID '483290941e434eb48b25f1c38a2a3fd7' === \n"
)


def launch(code: str = "", **overrides) -> spec.LaunchSpec:
    """The container `lr-finder run` would start: job_args' command in spec's container."""
    job = {k: overrides.pop(k) for k in ("params", "entry_point", "experiment", "run_name", "resume") if k in overrides}
    command = job_args.job_command(**job, code=bool(code))
    options = dict(image="lr-finder:latest", gpus="all", shm_size="2g", data="/srv/fashion", cache="", network="")
    options |= overrides
    return spec.launch_spec(
        names=(spec.TRACKING_ENV,), command=command.args, entrypoint=command.entrypoint, code=code, **options
    )


@pytest.mark.parametrize(
    "value, count, ids",
    [("all", -1, ()), ("ALL", -1, ()), ("2", 2, ()), ("none", 0, ()), ("device=0,2", 0, ("0", "2"))],
)
def test_gpus_follow_dockers_syntax(value, count, ids):
    request = spec.parse_gpus(value)
    assert (request.count, request.device_ids) == (count, ids)
    assert request.wanted == (value != "none")


@pytest.mark.parametrize("value", ["two", "device=", "-1", ""])
def test_bad_gpus_name_the_option_and_the_accepted_forms(value):
    with pytest.raises(spec.SpecError, match=r"--gpus .*all, a count"):
        spec.parse_gpus(value)


def test_the_job_gets_the_entry_point_experiment_and_params_through_mlflow_run():
    launched = launch(params=["auto_lr=true", "lr=1e-3"], entry_point="lr_find", experiment="nightly")
    assert launched.args == ("-e", "lr_find", "--experiment-name", "nightly", "-P", "auto_lr=true", "-P", "lr=1e-3")


@pytest.mark.parametrize("param", ["auto_lr", "=true", ""])
def test_a_param_without_key_and_value_is_refused(param):
    with pytest.raises(spec.SpecError, match="expected key=value"):
        launch(params=[param])


def test_dataset_is_mounted_read_only_at_data_and_the_cache_writable():
    launched = launch(data="/srv/fashion", cache="lr-finder-cache")
    data, cache = launched.mounts
    assert (data.source, data.target, data.read_only, data.is_bind) == ("/srv/fashion", "/data", True, True)
    assert (cache.target, cache.read_only, cache.is_bind) == ("/home/lrfinder/.cache", False, False)
    assert launch(data="").mounts == ()


@pytest.mark.parametrize("size", ["2g", "512m", "1073741824"])
def test_shared_memory_takes_dockers_sizes(size):
    assert launch(shm_size=size).shm_size == size


def test_bad_shared_memory_size_is_refused():
    with pytest.raises(spec.SpecError, match="--shm-size"):
        launch(shm_size="two gigs")


@pytest.mark.parametrize(("given", "cpus"), [("", 0.0), ("1", 1.0), ("1.5", 1.5), (" 4 ", 4.0)])
def test_a_cpu_quota_takes_dockers_numbers(given, cpus):
    launched = launch(cpus=given)
    assert launched.cpus == cpus
    assert f"cpus {given.strip() or 'all'}, " in launched.describe()[0]


@pytest.mark.parametrize("given", ["0", "-1", "two", "nan", "inf"])
def test_a_cpu_quota_that_is_no_positive_number_is_refused_by_name(given):
    with pytest.raises(spec.SpecError, match=r"^--cpus '.*': pass a number of CPUs above 0, such as 1, 2 or 1\.5$"):
        launch(cpus=given)


def test_credentials_pass_by_name_when_set_and_extra_names_must_exist():
    env = {"MLFLOW_TRACKING_URI": "http://x", "MLFLOW_TRACKING_PASSWORD": "p", "MLFLOW_TRACKING_USERNAME": "u"}
    names = spec.env_names({**env, "HOME": "/root"}, ["HOME"])
    assert names == ("HOME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME")
    assert "MLFLOW_TRACKING_TOKEN" not in names
    with pytest.raises(spec.SpecError, match="--env NOT_SET: not set"):
        spec.env_names(env, ["NOT_SET"])
    with pytest.raises(spec.SpecError, match="pass a variable name"):
        spec.env_names(env, ["A=b"])


def test_verbose_sets_the_jobs_log_level_and_a_level_the_caller_set_passes_by_name():
    assert spec.job_environ({"HOME": "/h"}, "http://m", verbose=True)[LEVEL_ENV] == "DEBUG"
    assert LEVEL_ENV not in spec.job_environ({}, "http://m", verbose=False)
    assert spec.job_environ({LEVEL_ENV: "WARNING"}, "http://m", verbose=False)[LEVEL_ENV] == "WARNING"
    assert spec.env_names({LEVEL_ENV: "INFO", "HOME": "/h"}) == (LEVEL_ENV, spec.TRACKING_ENV)
    assert spec.env_names({"HOME": "/h"}) == (spec.TRACKING_ENV,)


def test_the_log_level_is_no_secret_to_mask_in_the_jobs_log():
    env = {spec.TRACKING_ENV: "http://u:pw-42@h", "MLFLOW_TRACKING_PASSWORD": "pw-42", LEVEL_ENV: "DEBUG"}
    line = "12:00 DEBUG mlproject: reporting to http://u:pw-42@h"
    assert spec.scrub(line, spec.secret_values(env)) == "12:00 DEBUG mlproject: reporting to ***"


def test_describe_lists_names_never_values():
    launched = spec.launch_spec(
        "img",
        gpus="1",
        shm_size="2g",
        data="/d",
        cache="",
        names=("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"),
        network="host",
    )
    text = "\n".join(launched.describe())
    assert "environment (values hidden): MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_URI" in text
    assert "gpus 1" in text and "network host" in text and "/d -> /data (ro)" in text


@pytest.mark.parametrize("uri", ["", "sqlite:///secret-folder/mlflow.db", "file:///secret-folder", "secret-folder"])
def test_local_tracking_stores_are_refused_without_showing_the_uri(uri):
    problem = spec.tracking_problem(uri)
    assert problem and "secret-folder" not in problem


@pytest.mark.parametrize("uri", ["http://mlflow:5000", "https://u:p@mlflow.example", "databricks"])
def test_servers_are_accepted(uri):
    assert spec.tracking_problem(uri if uri != "databricks" else "databricks://profile") is None


def test_the_run_id_comes_from_mlflow_runs_log():
    assert job_args.find_run_id("noise\n" + RUN_LOG) == "483290941e434eb48b25f1c38a2a3fd7"
    assert job_args.find_run_id("error: cannot import torch\n") is None


def test_run_link_drops_credentials_and_needs_a_ui_url():
    link = run_url("https://ci:token@mlflow.example/", "3", "abc")
    assert link == "https://mlflow.example/#/experiments/3/runs/abc"
    assert run_url("", "3", "abc") == ""


def test_summary_holds_the_link_the_lrs_and_the_final_metrics():
    figures = {"lr_suggested": "0.0017", "lr_used": "0.0052", "lr_source": "finder", "test_acc": "0.9021"}
    text = run_outputs.summary_markdown("abc", "FINISHED", "https://m/#/experiments/1/runs/abc", figures)
    assert text.startswith("### lr-finder run [`abc`](https://m/#/experiments/1/runs/abc): FINISHED")
    assert "| 0.0017 | 0.0052 | finder | 0.9021 | - | - | - |" in text
    assert "`abc`: FAILED" in run_outputs.summary_markdown("abc", "FAILED", "", {})


def test_scrub_masks_every_secret_value():
    assert spec.scrub("to http://u:pw@h:5000 as pw-42", ["http://u:pw@h:5000", "pw-42", "u"]) == "to *** as ***"


def test_build_args_carry_provenance_and_explicit_pairs_win():
    args = spec.build_args(["TORCH_VARIANT=cpu", "PIP_INDEX_URL=http://m/simple"], "debian:12", "cu126", "abc")
    assert args == {
        "VCS_REF": "abc",
        "BASE_IMAGE": "debian:12",
        "TORCH_VARIANT": "cpu",
        "PIP_INDEX_URL": "http://m/simple",
    }
    with pytest.raises(spec.SpecError, match="--build-arg"):
        spec.build_args(["NOEQUALS"], "", "", "abc")


CHECK = job_args.CHECK_COMMAND


def test_doctor_checks_the_gpu_only_when_one_is_asked_for():
    names = ["GPU in a container", "tracking server", "threads", "data and code"]
    assert [p.name for p in probes.doctor_probes(launch(), CHECK)] == names
    assert [p.name for p in probes.doctor_probes(launch(gpus="none"), CHECK)] == names[1:]
    assert all(p.hint for p in probes.doctor_probes(launch(), CHECK))


def test_doctor_runs_the_jobs_own_check_of_the_parameters_run_would_pass():
    command = job_args.job_command(["dataset=imagefolder", "model=pkg.Net", "image_size=32"], code=True)
    assert command.check == (
        *CHECK, "--dataset", "imagefolder", "--model", "pkg.Net", "--image-size", "32", "--code", "/code",
        "--data-dir", "/data",
    )  # fmt: skip
    (probe,) = [p for p in probes.doctor_probes(launch(gpus="none"), command.check) if p.name == "data and code"]
    assert probe.command == command.check and not probe.gpus
    assert all(option in probe.hint for option in ("--data DIR", "--code DIR", "-P key=value"))


def test_the_check_leaves_out_the_study_parameters_for_compare_only():
    params = ["stage=plan", "lrs=1e-5,1e-1", "epochs=2"]
    assert job_args.check_args(params, "compare") == (*CHECK, "--epochs", "2")
    assert "--stage" in job_args.check_args(params, "main")  # not main's: the job's check says so, as its run would


def test_the_study_parameters_are_the_compare_commands_own():
    from mlproject.__main__ import cli as job_cli

    own = {p.name for p in job_cli.commands["compare"].params} - {p.name for p in job_cli.commands["check"].params}
    assert own == set(job_args.STUDY_PARAMS)


@pytest.mark.parametrize(
    "output, status, line",
    [
        (
            "torch warning\nok: model lenet on fashion-mnist from /data\n",
            0,
            "ok: model lenet on fashion-mnist from /data",
        ),
        (
            "error: invalid value for model: 'a.B'\n12:00 DEBUG urllib3: closing\n",
            2,
            "error: invalid value for model: 'a.B'",
        ),
        ("answers and accepts the credentials\n", 0, "answers and accepts the credentials"),
        ("", 1, "exit code 1, no output"),
    ],
)
def test_a_probes_line_is_the_checks_verdict_else_its_last_line(output, status, line):
    assert probes.answer(output, status) == line


@pytest.mark.parametrize(
    "model, code, verdict",
    [("lenet", 0, "ok: model lenet on the image folder "), ("nowhere.Net", 2, "error: invalid value for model: ")],
)
def test_the_jobs_check_answers_in_the_one_line_and_exit_code_doctor_reads(tmp_path, model, code, verdict):
    params = ["dataset=imagefolder", f"data_dir={write_tiny_image_folder(tmp_path)}", f"model={model}"]
    done = subprocess.run(
        [sys.executable, *job_args.check_args(params)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == code, done.stderr[-2000:]
    assert probes.answer(done.stdout + done.stderr, done.returncode).startswith(verdict)


def test_code_is_mounted_read_only_at_code_and_passed_to_the_job():
    launched = launch(code="/home/me/project")
    assert spec.Mount("/home/me/project", "/code", read_only=True) in launched.mounts
    assert launched.args[-2:] == ("-P", "code=/code")
    with pytest.raises(spec.SpecError, match="drop -P code"):
        launch(code="/home/me/project", params=["code=/elsewhere"])


@pytest.mark.parametrize(
    "params, data_dir",
    [
        ([], None),
        (["dataset=mnist"], None),
        (["dataset=my-images"], "/data"),
        (["dataset=my-images", "data_dir=/data/train"], "/data/train"),
    ],
)
def test_a_dataset_that_is_not_built_in_is_read_from_data(params, data_dir):
    args = launch(params=params).args
    passed = dict(value.split("=", 1) for flag, value in zip(args, args[1:], strict=False) if flag == "-P")
    assert passed.get("data_dir") == data_dir


def test_run_name_goes_to_mlflow_run():
    assert launch(run_name="nightly lenet").args[:4] == ("-e", "main", "--run-name", "nightly lenet")


def test_resume_runs_the_job_itself_on_the_stopped_run():
    launched = launch(resume="483290941e434eb48b25f1c38a2a3fd7", code="/home/me/project")
    assert launched.entrypoint + launched.args == (
        "python", "-m", "mlproject", "train", "--resume", "483290941e434eb48b25f1c38a2a3fd7",
    )  # fmt: skip
    assert spec.Mount("/home/me/project", "/code", read_only=True) in launched.mounts  # the run's code, again
    assert "job: python -m mlproject train --resume 483290941e434eb48b25f1c38a2a3fd7" in launched.describe()


@pytest.mark.parametrize(
    "changes, flags",
    [
        ({"params": ["lr=0.1"]}, "-P"),
        ({"entry_point": "lr_find", "experiment": "x"}, "--entry-point, --experiment-name"),
        ({"run_name": "again"}, "--run-name"),
    ],
)
def test_resume_refuses_what_would_change_the_run(changes, flags):
    with pytest.raises(spec.SpecError, match=f"own configuration and names: drop {flags}$"):
        launch(resume="abc123", **changes)


def test_resume_needs_a_run_id():
    with pytest.raises(spec.SpecError, match="--resume 'abc 123'"):
        launch(resume="abc 123")


@pytest.mark.parametrize(
    "value, is_folder_here, host",
    [("mydata", True, True), ("./mydata", False, True), ("data/sub", False, True), ("lr-finder-cache", False, False)],
)
def test_a_folder_here_or_a_path_is_bound_anything_else_is_a_volume(value, is_folder_here, host):
    assert spec.is_host_folder(value, is_folder_here) is host


def test_a_volume_needs_a_volume_name():
    assert not launch(data="lr-finder-data").mounts[0].is_bind
    with pytest.raises(spec.SpecError, match="--cache 'my cache': pass a folder"):
        launch(cache="my cache")


@pytest.mark.parametrize(
    "status, ours, refusal",
    [
        ("exited", True, None),
        ("created", True, None),
        ("running", True, "a container named job is still running (an earlier lr-finder run): `docker stop job`"),
        ("exited", False, "a container named job exists that lr-finder did not start: remove it (docker rm job)"),
    ],
)
def test_a_leftover_of_this_service_is_cleared_anything_else_refused(status, ours, refusal):
    problem = spec.name_conflict("job", status, ours)
    assert (problem is None) if refusal is None else problem.startswith(refusal)


def test_pull_progress_counts_layers_and_megabytes_and_speaks_now_and_then():
    pull = progress.TransferProgress(every_s=5)
    events = [
        ({"status": "Pulling from nvidia/cuda", "id": "13.0.0-base"}, 0.0),
        ({"status": "Pulling fs layer", "id": "a"}, 0.1),
        ({"status": "Already exists", "id": "b"}, 0.2),
        ({"status": "Downloading", "id": "a", "progressDetail": {"current": 1_000_000, "total": 30_000_000}}, 1.0),
        ({"status": "Downloading", "id": "a", "progressDetail": {"current": 2_000_000, "total": 30_000_000}}, 2.0),
        ({"status": "Downloading", "id": "a", "progressDetail": {"current": 20_000_000, "total": 30_000_000}}, 6.0),
        ({"status": "Download complete", "id": "a"}, 6.5),
        ({"status": "Pull complete", "id": "a"}, 7.0),
        ({"status": "Digest: sha256:0123"}, 7.1),
    ]
    lines = [line for event, now in events if (line := pull.line(event, now))]
    assert lines == [
        "Pulling from nvidia/cuda",
        "layers 0/1 done, 0.0 of 0.0 MB downloaded",
        "layers 1/2 done, 0.0 of 0.0 MB downloaded",
        "layers 1/2 done, 20.0 of 30.0 MB downloaded",
        "layers 2/2 done, 30.0 of 30.0 MB downloaded",
        "Digest: sha256:0123",
    ]


def test_a_log_is_cut_into_lines_at_newlines_and_progress_bars_and_keeps_split_characters_whole():
    chunks = [b"epoch 1\r", b"epoch 2\r\nLoss \xce", b"\xbb=0.1\n", b"no newline"]
    assert list(progress.log_lines(chunks)) == ["epoch 1\r", "epoch 2\r\n", "Loss \u03bb=0.1\n", "no newline"]


def test_the_run_record_names_the_run_its_experiment_status_and_link():
    record = run_outputs.run_record("abc", "3", "FINISHED", "https://m/#/experiments/3/runs/abc")
    assert record == {
        "run_id": "abc", "experiment_id": "3", "status": "FINISHED", "link": "https://m/#/experiments/3/runs/abc",
    }  # fmt: skip


# --- the command line refuses before it touches docker -----------------------------------------------------------


def invoke(*args: str, env: dict[str, str] | None = None):
    clean = {"MLFLOW_TRACKING_URI": None, "MLFLOW_TRACKING_PASSWORD": None, "DOCKER_HOST": "unix:///nonexistent"}
    return CliRunner().invoke(cli, list(args), env={**clean, **(env or {})})


def test_run_without_a_tracking_server_is_refused_in_one_line():
    result = invoke("run", "--data", "", "-P", "auto_lr=true")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: no tracking server: set MLFLOW_TRACKING_URI or pass --tracking-uri (the container's own store dies "
        "with it)"
    ]


def test_run_refuses_bad_gpus_and_a_missing_data_folder():
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert "--gpus 'two'" in invoke("run", "--data", "", "--gpus", "two", env=env).output
    result = invoke("run", "--data", "/nonexistent/fashion", env=env)
    assert result.exit_code == 2 and "--data /nonexistent/fashion: no such folder" in result.output


def test_run_without_an_engine_says_so_without_printing_secrets():
    env = {"MLFLOW_TRACKING_URI": "http://u:pw-SECRET@mlflow:5000", "MLFLOW_TRACKING_PASSWORD": "pw-SECRET"}
    result = invoke("run", "--data", "", env=env)
    assert result.exit_code == 1
    assert "no Docker engine answers" in result.output and "start dockerd or set DOCKER_HOST" in result.output
    assert "pw-SECRET" not in result.output


@pytest.mark.parametrize(
    "args, caller, names",
    [
        (["-v"], {}, "LR_FINDER_LOG_LEVEL, MLFLOW_TRACKING_URI"),
        ([], {LEVEL_ENV: "WARNING"}, "LR_FINDER_LOG_LEVEL, MLFLOW_TRACKING_URI"),
        ([], {}, "MLFLOW_TRACKING_URI"),
    ],
)
def test_verbose_or_the_callers_log_level_goes_into_the_container_by_name(args, caller, names):
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", LEVEL_ENV: None, **caller}
    result = invoke("run", "--data", "", *args, env=env)
    assert f"lr-finder: environment (values hidden): {names}\n" in result.output
    assert "no Docker engine answers" in result.output


def test_verbose_passes_debug_and_a_callers_level_as_it_is(monkeypatch):
    options = dict(image="i", gpus="none", data="", cache="", tracking_uri="http://m", env_extra=(), network="")
    monkeypatch.setenv(LEVEL_ENV, "WARNING")
    assert plan(**options, shm_size="2g", verbose=True)[2][LEVEL_ENV] == "DEBUG"
    assert plan(**options, shm_size="2g")[2][LEVEL_ENV] == "WARNING"


def test_doctor_without_an_engine_fails_with_a_fix():
    result = invoke("doctor", "-v", "--data", "", env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert result.exit_code == 1
    assert "FAIL  docker engine: no Docker engine answers" in result.output
    assert "fix: " in result.output


def test_build_needs_a_dockerfile(tmp_path):
    result = invoke("build", "--context", str(tmp_path))
    assert result.exit_code == 2 and f"no Dockerfile in {tmp_path}" in result.output


def test_version_is_the_packages():
    from mlproject import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and result.output == f"lr-finder {__version__}\n"


def test_relative_and_home_folders_are_bound_by_their_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "mydata").mkdir()
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path)
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "HOME": str(tmp_path)}
    result = invoke("run", "--data", "mydata", "--code", "~/src", "--cache", "lrf-cache", env=env)
    assert (
        f"mounts: {tmp_path}/mydata -> /data (ro), lrf-cache -> /home/lrfinder/.cache, {tmp_path}/src -> /code (ro)"
        in (result.output)
    )
    assert "-P code=/code" in result.output


def test_a_missing_code_folder_is_refused_in_one_line(tmp_path):
    result = invoke("run", "--data", "", "--code", str(tmp_path / "nope"), env={"MLFLOW_TRACKING_URI": "http://m:5000"})
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: --code {tmp_path / 'nope'}: no such folder on this machine"]


def test_resume_with_params_is_refused_in_one_line():
    result = invoke(
        "run", "--data", "", "--resume", "abc", "-P", "lr=0.1", env={"MLFLOW_TRACKING_URI": "http://m:5000"}
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: --resume continues the run with its own configuration and names: drop -P"
    ]
