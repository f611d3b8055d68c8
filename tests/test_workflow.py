"""The container and CI files, checked offline: hadolint, the CI schemas, zizmor, the build context, the pins, and
the pipelines' own commands run with stand-ins for docker and lr-finder."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from tests.helpers import REPO

BIN = Path(sys.executable).parent
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed: pip install -e '.[test]'")
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_dockerfile_passes_hadolint():
    result = tool("hadolint", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_a_careless_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y python3\nRUN pip install torch\n")
    result = tool("hadolint", str(bad))
    assert result.returncode != 0 and "DL3008" in result.stdout


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_github_schema(workflow):
    result = tool("check-jsonschema", "--builtin-schema", "vendor.github-workflows", str(workflow))
    assert result.returncode == 0, result.stdout + result.stderr


def test_gitlab_pipeline_matches_the_gitlab_schema():
    result = tool("check-jsonschema", "--builtin-schema", "vendor.gitlab-ci", str(REPO / ".gitlab-ci.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_has_no_zizmor_findings(workflow):
    result = tool("zizmor", "--offline", str(workflow))
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_does_flag_a_template_injection(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: issues\npermissions: {}\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n"
        '      - run: echo "${{ github.event.issue.title }}"\n'
    )
    result = tool("zizmor", "--offline", str(bad))
    assert result.returncode != 0 and "template-injection" in result.stdout


def test_build_context_holds_the_project_and_nothing_of_runs_data_or_git(tmp_path):
    from docker.utils.build import exclude_paths

    for path in [
        "MLproject", "conda.yaml", "mlproject/__init__.py", "mlflow.db", "mlruns/0/meta.yaml", "mlartifacts/1/a.png",
        "data/train-images-idx3-ubyte", "mlproject/mlflow.db", ".git/HEAD", ".venv/bin/python", "tests/test_x.py",
        "mlproject/__pycache__/x.pyc",
    ]:  # fmt: skip
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    rules = (REPO / ".dockerignore").read_text().splitlines()
    sent = {p for p in exclude_paths(str(tmp_path), rules) if not (tmp_path / p).is_dir()}
    assert sent == {"MLproject", "conda.yaml", "mlproject/__init__.py"}


def test_dockerfile_torch_pins_are_conda_yamls():
    dockerfile = (REPO / "Dockerfile").read_text()
    conda = (REPO / "conda.yaml").read_text()
    for arg, package in (("TORCH_VERSION", "torch"), ("TORCHVISION_VERSION", "torchvision")):
        pinned = re.search(rf"^\s*-\s*{package}==(\S+)$", conda, flags=re.MULTILINE).group(1)
        assert re.search(rf"^ARG {arg}={re.escape(pinned)}$", dockerfile, flags=re.MULTILINE), (arg, pinned)


# --- the pipelines' structure ----------------------------------------------------------------------------------

GITHUB = REPO / ".github" / "workflows"


def flow(name: str) -> dict:
    return yaml.safe_load((GITHUB / name).read_text())


def step(job: dict, name: str) -> dict:
    return next(s for s in job["steps"] if s.get("name", "").startswith(name))


def gitlab() -> dict:
    return yaml.safe_load((REPO / ".gitlab-ci.yml").read_text())


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_every_action_is_pinned_to_a_commit_and_every_run_block_is_free_of_expressions(workflow):
    text = workflow.read_text()
    for ref in re.findall(r"uses: (\S+)", text):
        assert ref.startswith("./") or re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", ref), ref
    jobs = yaml.safe_load(text)["jobs"].values()
    runs = [s["run"] for job in jobs for s in job.get("steps", []) if "run" in s]
    assert not [r for r in runs if "${{" in r], "values reach run blocks through env only (no template injection)"


def test_ci_lints_and_runs_each_test_group_as_its_own_job_with_read_only_permissions():
    ci = flow("ci.yml")
    assert set(ci[True]) == {"push", "pull_request"} and ci["permissions"] == {"contents": "read"}
    lint = " ".join(s.get("run", "") for s in ci["jobs"]["lint"]["steps"])
    assert "ruff check" in lint and "ruff format --check" in lint
    groups = {m["group"]: m["markers"] for m in ci["jobs"]["test"]["strategy"]["matrix"]["include"]}
    assert set(groups) == {"cpu", "slow", "docker", "browser"}
    assert all("not gpu" in markers for markers in groups.values())
    assert 'pytest -m "$MARKERS"' in step(ci["jobs"]["test"], "Test")["run"]
    assert any(s.get("run", "").startswith("bash .ci/setup --tests") for s in ci["jobs"]["test"]["steps"])


def test_gpu_jobs_queue_for_runners_instead_of_one_repository_wide_lock():
    job, called = flow("gpu-job.yml"), flow("gpu-run.yml")
    assert "concurrency" not in job and "concurrency" not in called
    assert {"workflow_dispatch", "schedule"} <= set(job[True]) and "study_lrs" in job[True]["workflow_dispatch"][
        "inputs"
    ]
    (run,) = called["jobs"].values()
    assert {"self-hosted", "gpu"} <= set(run["runs-on"]) and run["environment"] == "mlflow-tracking"
    assert run["env"]["IMAGE"] == "lr-finder:${{ github.sha }}"
    env = step(run, "Run")["env"]
    assert env["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    assert env["MLFLOW_TRACKING_PASSWORD"] == "${{ secrets.MLFLOW_TRACKING_PASSWORD }}"
    assert "resource_group" not in str(gitlab())


def test_study_mode_plans_then_fans_out_one_job_per_member_then_reports():
    jobs = flow("gpu-job.yml")["jobs"]
    assert jobs["plan"]["with"]["stage_params"].startswith("stage=plan lrs=")
    members = jobs["members"]
    assert members["needs"] == "plan" and members["strategy"]["fail-fast"] is False
    assert members["strategy"]["matrix"]["member"] == "${{ fromJSON(needs.plan.outputs.members) }}"
    stage = members["with"]["stage_params"]
    assert "parent_run=${{ needs.plan.outputs.parent_run }}" in stage and "member=${{ matrix.member }}" in stage
    assert jobs["plan"]["with"]["experiment"] == members["with"]["experiment"]
    report = jobs["report"]
    assert report["needs"] == ["plan", "members"] and "always()" in report["if"]
    assert "lr-finder report --experiment" in step(report, "Report")["run"]
    outputs = flow("gpu-run.yml")["jobs"]["run"]["outputs"]
    assert outputs == {k: f"${{{{ steps.study.outputs.{k} }}}}" for k in ("parent_run", "members")}


def test_gitlab_study_runs_a_child_pipeline_from_the_plans_artifact():
    pipeline = gitlab()
    trigger = pipeline["study-members"]["trigger"]
    assert trigger["include"] == [{"artifact": "study-members.yml", "job": "study-plan"}]
    assert trigger["strategy"] == "depend" and pipeline["study-members"]["needs"] == ["study-plan"]
    assert "study-members.yml" in pipeline["study-plan"]["artifacts"]["paths"]
    assert pipeline["study-report"]["rules"][0]["when"] == "always"
    assert pipeline[".gpu"]["tags"] == ["gpu"] and pipeline["variables"]["IMAGE"] == "lr-finder:$CI_COMMIT_SHA"


# --- the pipelines' commands, run with stand-ins for docker and lr-finder ---------------------------------------


def bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A run block as the runners run it: bash with -e and pipefail (GitHub's `shell: bash`, GitLab's shell)."""
    path = cwd / "step.sh"
    path.write_text(script)
    base = {"PATH": f"{cwd / 'bin'}:/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(path)],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def stand_in(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def recorder(tmp_path) -> Path:
    """.venv/bin/lr-finder that records its arguments, one per line, each call after a line `--`."""
    stand_in(tmp_path / ".venv" / "bin" / "lr-finder", 'printf -- "--\\n"; printf "%s\\n" "$@"\n')
    return tmp_path


def calls(output: str) -> list[list[str]]:
    return [chunk.strip("\n").split("\n") for chunk in output.split("--\n") if chunk.strip()]


GITHUB_RUN_ENV = {
    "IMAGE": "lr-finder:abc",
    "CONTAINER": "lr-finder-1-1-train",
    "ENTRY_POINT": "compare",
    "EXPERIMENT": "lr-finder-ci",
    "MLFLOW_UI_URL": "https://mlflow.example.com",
    "PARAMS": "auto_lr=true epochs=2 stage=plan lrs=1e-5,1e-1",
}


@pytest.mark.parametrize("gpus, expected", [("", "all"), ("2,3", "device=2,3")])
def test_github_run_step_gives_the_job_this_runners_gpus_and_every_param(recorder, gpus, expected):
    run = step(flow("gpu-run.yml")["jobs"]["run"], "Run")["run"]
    env = {**GITHUB_RUN_ENV, "GITHUB_STEP_SUMMARY": str(recorder / "summary.md"), "LR_FINDER_GPUS": gpus}
    result = bash(run, recorder, env)
    assert result.returncode == 0, result.stderr
    (argv,) = calls(result.stdout)
    assert argv[:3] == ["run", "--image", "lr-finder:abc"] and argv[argv.index("--gpus") + 1] == expected
    params = [argv[i + 1] for i, word in enumerate(argv) if word == "-P"]
    assert params == ["auto_lr=true", "epochs=2", "stage=plan", "lrs=1e-5,1e-1"]
    assert argv[argv.index("--outputs") + 1] == "outputs"
    assert argv[argv.index("--summary") + 1] == env["GITHUB_STEP_SUMMARY"]
    check_options(argv)


def check_options(argv: list[str]) -> None:
    """The options of the `lr-finder` command the pipeline passes exist."""
    from service.cli import cli

    known = {opt for param in cli.commands[argv[0]].params for opt in param.opts}
    used = {word for word in argv[1:] if word.startswith("-") and not word[1:2].isdigit()}
    assert used <= known, sorted(used - known)


def args_line() -> str:
    """GitLab's .gpu line that turns PARAMS into the job's -P options (`args`)."""
    (line,) = [line for line in gitlab()[".gpu"]["before_script"] if line.startswith("args=()")]
    return line


@pytest.mark.parametrize("job", ["gpu-job", "study-plan", ".study-member"])
def test_gitlab_job_scripts_run_with_the_runners_gpus_and_every_param(recorder, job):
    pipeline = gitlab()
    script = "\n".join([args_line(), pipeline[job]["script"][0]])
    env = {"IMAGE": "lr-finder:abc", "CONTAINER": "c", "EXPERIMENT": "e", "PARAMS": "auto_lr=true epochs=2"}
    env |= {"STUDY_LRS": "1e-5,1e-1", "PARENT_RUN": "0" * 32, "MEMBER": "lr=1e-05", "LR_FINDER_GPUS": "1"}
    result = bash(script, recorder, env)
    assert result.returncode == 0, result.stderr
    (argv,) = calls(result.stdout)
    assert argv[argv.index("--gpus") + 1] == "device=1" and argv[argv.index("--outputs") + 1] == "outputs"
    params = [argv[i + 1] for i, word in enumerate(argv) if word == "-P"]
    assert params[:2] == ["auto_lr=true", "epochs=2"]
    if job == ".study-member":
        assert params[2:] == ["stage=member", "lrs=1e-5,1e-1", f"parent_run={'0' * 32}", "member=lr=1e-05"]
    check_options(argv)


@pytest.mark.parametrize("ci", ["github", "gitlab"])
def test_doctor_checks_the_entry_point_and_params_the_run_will_get(recorder, ci):
    if ci == "github":
        script = step(flow("gpu-run.yml")["jobs"]["run"], "Check the runner")["run"]
    else:
        before = gitlab()[".gpu"]["before_script"]
        script = "\n".join([args_line(), *(line for line in before if "lr-finder doctor" in line)])
    env = {**GITHUB_RUN_ENV, "LR_FINDER_GPUS": "1"}
    result = bash(script, recorder, env)
    assert result.returncode == 0, result.stderr
    (argv,) = calls(result.stdout)
    assert argv[:3] == ["doctor", "--image", "lr-finder:abc"] and argv[argv.index("--gpus") + 1] == "device=1"
    params = [argv[i + 1] for i, word in enumerate(argv) if word == "-P"]
    assert params == ["auto_lr=true", "epochs=2", "stage=plan", "lrs=1e-5,1e-1"]
    if ci == "github":  # compare: the job's check leaves the study's own parameters to the study
        assert argv[argv.index("--entry-point") + 1] == "compare"
    check_options(argv)


def pipeline_lines() -> list[tuple[str, str]]:
    """Every shell line the GPU pipelines run, with where it is: GitHub's run blocks (continuations joined) and
    GitLab's scripts."""
    found = []
    for workflow in WORKFLOWS:
        for name, job in flow(workflow.name)["jobs"].items():
            runs = [s["run"] for s in job.get("steps", []) if "run" in s]
            found += [
                (f"{workflow.name} {name}", line) for run in runs for line in run.replace("\\\n", " ").splitlines()
            ]
    for name, job in gitlab().items():
        lines = [
            line for key in ("before_script", "script") for line in (job.get(key, []) if isinstance(job, dict) else [])
        ]
        found += [(f".gitlab-ci.yml {name}", line) for line in lines]
    return found


def lr_finder_commands() -> list[tuple[str, list[str]]]:
    """Every `.venv/bin/lr-finder ...` command of the pipelines: (where, its words, up to a redirection)."""
    return [
        (where, shlex.split(line.split(".venv/bin/lr-finder ", 1)[1].split(" >", 1)[0]))
        for where, line in pipeline_lines()
        if ".venv/bin/lr-finder " in line
    ]


def mlproject_parameters() -> dict[str, set[str]]:
    """MLproject's entry points -> their parameters."""
    points = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    return {name: set(entry["parameters"]) for name, entry in points.items()}


def test_every_lr_finder_command_of_the_pipelines_names_real_options_and_parameters():
    from service.cli import cli

    commands = lr_finder_commands()
    assert {words[0] for _, words in commands} >= {"build", "doctor", "run", "report", "deploy"}
    for where, words in commands:
        command, rest = cli.commands[words[0]], words[1:]
        while isinstance(command, click.Group):  # lr-finder deploy study
            command, rest = command.commands[rest[0]], rest[1:]
        known = {opt for param in command.params for opt in param.opts}
        used = {word for word in rest if word.startswith("-") and not word[1:2].isdigit()}
        assert used <= known, (where, sorted(used - known))
        entry = rest[rest.index("--entry-point") + 1] if "--entry-point" in rest else "main"
        keys = {rest[i + 1].split("=", 1)[0] for i, word in enumerate(rest[:-1]) if word == "-P"}
        assert keys <= mlproject_parameters()[{"$ENTRY_POINT": "compare"}.get(entry, entry)], (where, keys)


def test_the_pipelines_default_params_are_mlprojects():
    inputs = flow("gpu-job.yml")[True]["workflow_dispatch"]["inputs"]
    texts = [inputs["params"]["default"], gitlab()["variables"]["PARAMS"]]
    texts += [job.get("with", {}).get("stage_params", "") for job in flow("gpu-job.yml")["jobs"].values()]
    keys = {word.split("=", 1)[0] for text in texts for word in text.split() if re.match(r"\w+=", word)}
    assert {"auto_lr", "stage", "lrs", "parent_run", "member"} == keys
    assert keys <= mlproject_parameters()["compare"] and "auto_lr" in mlproject_parameters()["main"]


def test_the_host_side_installs_the_locks_versions_not_pins_of_its_own():
    installs = [(where, line) for where, line in pipeline_lines() if "pip install" in line and "ruff" not in line]
    assert len(installs) == 4, installs  # gpu-run.yml, gpu-job.yml's report; GitLab's .gpu and study-report
    assert all(line.strip().endswith("/pip install -q -c constraints.txt .") for _, line in installs), installs


DOCKER_STAND_IN = """
if [ "$1 $2" = "image ls" ]; then printf '%s\\n' $IMAGES; exit 0; fi
echo "$*" >> "$DOCKER_LOG"
if [ "$1 $2" = "image rm" ]; then for i in "${@:3}"; do [ "$i" = lr-finder:busy ] && exit 1; done; fi
exit 0
"""


def prune_scripts() -> dict[str, str]:
    github = step(flow("gpu-run.yml")["jobs"]["run"], "Remove the container")["run"]
    return {"github": github, "gitlab": "\n".join(gitlab()[".gpu"]["after_script"])}


@pytest.mark.parametrize("ci", ["github", "gitlab"])
def test_cleanup_keeps_this_image_and_the_two_newest_others_and_removes_the_rest(tmp_path, ci):
    stand_in(tmp_path / "bin" / "docker", DOCKER_STAND_IN)
    log = tmp_path / "docker.log"
    images = "lr-finder:new lr-finder:this lr-finder:older lr-finder:busy lr-finder:old lr-finder:oldest"
    env = {"IMAGE": "lr-finder:this", "CONTAINER": "c", "KEEP_OLDER_IMAGES": "2", "IMAGES": images}
    result = bash(prune_scripts()[ci], tmp_path, {**env, "DOCKER_LOG": str(log)})
    assert result.returncode == 0, result.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == "rm -f c"
    (removal,) = [line for line in lines if line.startswith("image rm")]
    assert removal.split()[2:] == ["lr-finder:busy", "lr-finder:old", "lr-finder:oldest"]
    assert "lr-finder:this" not in log.read_text()
    assert any(line.startswith("image prune -f --filter label=org.opencontainers.image.title=") for line in lines)


@pytest.fixture
def real_cli(tmp_path) -> Path:
    """.venv/bin/lr-finder that is this checkout's command."""
    stand_in(
        tmp_path / ".venv" / "bin" / "lr-finder",
        f'PYTHONPATH={REPO} exec {sys.executable} -c "from service.cli import main; main()" "$@"\n',
    )
    (tmp_path / "outputs").mkdir()
    study = {"parent_run": "f" * 32, "members": ["lr=1e-05", "lr=0.1", "lr=finder"]}
    (tmp_path / "outputs" / "study.json").write_text(json.dumps(study))
    return tmp_path


def test_github_plan_step_exports_the_parent_run_and_members_for_the_matrix(real_cli):
    script = step(flow("gpu-run.yml")["jobs"]["run"], "Hand the study's members")["run"]
    output = real_cli / "github_output"
    result = bash(script, real_cli, {"GITHUB_OUTPUT": str(output)})
    assert result.returncode == 0, result.stderr
    values = dict(line.split("=", 1) for line in output.read_text().splitlines())
    assert values["parent_run"] == "f" * 32
    assert json.loads(values["members"]) == ["lr=1e-05", "lr=0.1", "lr=finder"]


def test_gitlab_plan_writes_a_child_pipeline_that_gitlab_accepts(real_cli):
    (real_cli / ".gitlab-ci.yml").write_text((REPO / ".gitlab-ci.yml").read_text())
    script = gitlab()["study-plan"]["script"][1]
    result = bash(script, real_cli, {})
    assert result.returncode == 0, result.stderr
    child = real_cli / "study-members.yml"
    check = tool("check-jsonschema", "--builtin-schema", "vendor.gitlab-ci", str(child))
    assert check.returncode == 0, check.stdout
    member = yaml.safe_load(child.read_text())["study-member"]
    assert member["parallel"]["matrix"] == [{"MEMBER": ["lr=1e-05", "lr=0.1", "lr=finder"]}]
