"""The container and CI files, checked offline: hadolint, the CI schemas, zizmor, the build context and the pins."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

BIN = Path(sys.executable).parent
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
WORKFLOW = REPO / ".github" / "workflows" / "gpu-job.yml"


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


def test_workflow_runs_one_gpu_job_at_a_time_on_a_gpu_runner_with_secrets_from_its_environment():
    flow = yaml.safe_load(WORKFLOW.read_text())
    triggers = flow[True]  # YAML 1.1 reads the key `on` as true
    assert {"workflow_dispatch", "schedule"} <= set(triggers)
    assert flow["concurrency"] == {"group": "lr-finder-gpu", "cancel-in-progress": False}
    (job,) = flow["jobs"].values()
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])
    assert job["environment"] == "mlflow-tracking"
    train = next(s for s in job["steps"] if s.get("name") == "Train")
    assert train["env"]["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    assert train["env"]["MLFLOW_TRACKING_PASSWORD"] == "${{ secrets.MLFLOW_TRACKING_PASSWORD }}"
    assert "lr-finder run" in train["run"] and "--gpus all" in train["run"]
    assert '--summary "$GITHUB_STEP_SUMMARY"' in train["run"]
    assert "auto_lr=true" in train["env"]["PARAMS"]
    assert any("lr-finder build" in s.get("run", "") for s in job["steps"])


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
