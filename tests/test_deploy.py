"""deploy/ and `lr-finder deploy`, validated statically: no Kubernetes cluster or Slurm runs here.

Core kinds with kubernetes-validate --strict (Kubernetes 1.33 and 1.37), the TrainJob against Kubeflow Trainer
v2.3.0's CRD schema (vendored) with check-jsonschema, the backend project through MLflow's own loader and Job
builder, the sbatch script with shellcheck; each validator is shown to reject a bad file first.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from mlproject.__main__ import cli as job_cli
from service import deploy as D
from service.cli import cli
from tests.helpers import REPO

BIN = Path(sys.executable).parent
KUBE = REPO / "deploy" / "kubernetes"
SBATCH = REPO / "deploy" / "slurm" / "lr-finder.sbatch"
BACKEND = KUBE / "mlflow-backend"
SCHEMA = KUBE / "schemas" / "trainjob-v1alpha1.json"
# The oldest Kubernetes the manifests are meant for (Indexed Jobs and their pod DNS are long GA there) and the
# newest schema kubernetes-validate 1.37.0 ships.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
EXAMPLE_IMAGE = "registry.example.com/lr-finder:latest"
EXAMPLE = D.Target(image=EXAMPLE_IMAGE, nodes=2, gpus=1)  # what the committed files hold
# Job options the committed files use that the job is gaining in a parallel change; checked like the others
# as soon as the job has them.
PENDING_JOB_OPTIONS = {"--num-nodes", "--stage", "--parent-run", "--member", "--parallel"}
RUN_ID = "0123456789abcdef0123456789abcdef"


def tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        hint = "apt-get install shellcheck" if name == "shellcheck" else "pip install -e '.[test]'"
        pytest.skip(f"{name} is not installed: {hint}")
    return str(found)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=REPO)


def kube_validate(path: Path, version: str = KUBERNETES_VERSIONS[0]) -> subprocess.CompletedProcess:
    return run(tool("kubernetes-validate"), "--strict", "--no-warn", "-k", version, str(path))


def strict(schema: Any) -> Any:
    """The CRD schema as strict field validation applies it: unknown fields of a described object are errors."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    described = "properties" in schema and "additionalProperties" not in schema
    if described and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def strict_schema(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("schema") / "trainjob-strict.json"
    path.write_text(json.dumps(strict(json.loads(SCHEMA.read_text()))))
    return path


def crd_validate(schema: Path, path: Path) -> subprocess.CompletedProcess:
    return run(tool("check-jsonschema"), "--schemafile", str(schema), str(path))


def deploy(*args: str) -> Any:
    return CliRunner().invoke(cli, ["deploy", *args])


def misspell(text: str, field: str) -> str:
    assert f" {field}:" in text
    return text.replace(f" {field}:", f" {field}s:", 1)


# --- the validators themselves ---------------------------------------------------------------------------------


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text(misspell((KUBE / "indexed-job.yaml").read_text(), "subdomain"))
    result = kube_validate(bad)
    assert result.returncode != 0 and "subdomains" in result.stdout + result.stderr


def test_the_strict_crd_schema_rejects_an_unknown_field_that_the_plain_one_lets_through(tmp_path, strict_schema):
    bad = tmp_path / "trainjob.yaml"
    bad.write_text(misspell((KUBE / "trainjob.yaml").read_text(), "numProcPerNode"))
    assert crd_validate(SCHEMA, bad).returncode == 0  # a CRD schema alone does not forbid unknown fields
    result = crd_validate(strict_schema, bad)
    assert result.returncode != 0 and "numProcPerNodes" in result.stdout


def test_shellcheck_flags_an_unquoted_variable(tmp_path):
    bad = tmp_path / "bad.sbatch"
    bad.write_text("#!/bin/bash\nIMAGE=$1\nsrun --container-image=$IMAGE true\n")
    result = run(tool("shellcheck"), str(bad))
    assert result.returncode != 0 and "SC2086" in result.stdout


# --- the committed files, as they are --------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", [KUBE / "indexed-job.yaml", BACKEND / "job-template.yaml"], ids=lambda p: p.name)
def test_committed_core_manifests_pass_kubernetes_validate_strict(path, version):
    result = kube_validate(path, version)
    assert result.returncode == 0, result.stdout + result.stderr


def test_committed_trainjob_matches_the_trainjob_crd_strictly(strict_schema):
    result = crd_validate(strict_schema, KUBE / "trainjob.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_vendored_schema_is_the_trainjobs_and_names_its_source():
    schema = json.loads(SCHEMA.read_text())
    assert {"runtimeRef", "trainer", "runtimePatches"} <= set(schema["properties"]["spec"]["properties"])
    readme = (KUBE / "schemas" / "README.md").read_text()
    assert "kubeflow/trainer/blob/v2.3.0/manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml" in readme
    assert yaml.safe_load((KUBE / "trainjob.yaml").read_text())["apiVersion"] == "trainer.kubeflow.org/v1alpha1"


def test_sbatch_script_passes_shellcheck():
    result = run(tool("shellcheck"), str(SBATCH))
    assert result.returncode == 0, result.stdout


def test_committed_files_are_what_deploy_writes_for_the_example():
    """So that validating them validates the templates `lr-finder deploy` fills in, and they do not drift apart."""
    docs = list(yaml.safe_load_all((KUBE / "indexed-job.yaml").read_text()))
    assert D.indexed_job(docs, EXAMPLE) == docs
    trainjob = yaml.safe_load((KUBE / "trainjob.yaml").read_text())
    assert D.trainjob(trainjob, EXAMPLE) == trainjob
    template = yaml.safe_load((BACKEND / "job-template.yaml").read_text())
    assert D.backend_job_template(template, EXAMPLE) == template
    slurm = dataclasses.replace(EXAMPLE, image="/shared/containers/lr-finder.sqsh")
    assert D.sbatch(SBATCH.read_text(), slurm, "04:00:00") == SBATCH.read_text()


def test_backend_project_is_derived_from_the_root_mlproject():
    derived = D.backend_project(yaml.safe_load((REPO / "MLproject").read_text()), EXAMPLE)
    committed = yaml.safe_load((BACKEND / "MLproject").read_text())
    assert committed == derived, (
        "deploy/kubernetes/mlflow-backend/MLproject is out of date: run `lr-finder deploy kubernetes --manifest "
        f"mlflow-backend --image {EXAMPLE_IMAGE} --out /tmp/backend` and copy /tmp/backend/mlflow-backend/MLproject"
    )


def test_backend_config_names_the_template_and_the_images_repository():
    config = json.loads((BACKEND / "kubernetes_config.json").read_text())
    assert config == D.backend_config(EXAMPLE, "deploy/kubernetes/mlflow-backend/job-template.yaml")
    assert (REPO / config["kube-job-template-path"]).is_file()


# --- MLflow's own loader and Job builder -----------------------------------------------------------------------


@pytest.fixture
def mlflow_kubernetes(monkeypatch) -> Any:
    """mlflow.projects.kubernetes; it imports the kubernetes client at import time, which the Job builder used
    here never calls: a stand-in takes its place where the client is not installed."""
    import types

    try:
        import kubernetes  # noqa: F401
    except ImportError:
        stub = types.ModuleType("kubernetes")
        stub.config = types.ModuleType("kubernetes.config")
        stub.config.config_exception = types.ModuleType("kubernetes.config.config_exception")
        stub.config.config_exception.ConfigException = type("ConfigException", (Exception,), {})
        for name, module in [
            ("kubernetes", stub),
            ("kubernetes.config", stub.config),
            ("kubernetes.config.config_exception", stub.config.config_exception),
        ]:
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.delitem(sys.modules, "mlflow.projects.kubernetes", raising=False)
    from mlflow.projects import kubernetes as kb

    return kb


STAGE_PARAMS = {"study_member": {"parent_run": RUN_ID, "member": "lr=1e-05"}}


def mlflow_job(kb: Any, project_dir: Path, template: Path, entry: str) -> dict[str, Any]:
    """The Job `mlflow run --backend kubernetes -e ENTRY` would create, built by MLflow's own functions."""
    from mlflow.projects._project_spec import load_project

    project = load_project(str(project_dir))
    command = project.get_entry_point(entry).compute_command(STAGE_PARAMS.get(entry, {}), "/tmp/mlflow-storage")
    env = {"MLFLOW_RUN_ID": RUN_ID, "MLFLOW_TRACKING_URI": "http://mlflow.example.com", "MLFLOW_EXPERIMENT_ID": "1"}
    return kb._get_kubernetes_job_definition(
        project.name,
        "registry.example.com/lr-finder",
        "sha256:" + "0" * 64,
        kb._get_run_command([command]),
        env,
        yaml.safe_load(template.read_text()),
    )


def test_mlflows_loader_refuses_a_docker_project_without_an_image(tmp_path):
    from mlflow.exceptions import ExecutionException
    from mlflow.projects._project_spec import load_project

    (tmp_path / "MLproject").write_text("name: x\ndocker_env:\n  volumes: ['/a:/b']\nentry_points: {}\n")
    with pytest.raises(ExecutionException, match="no image"):
        load_project(str(tmp_path))


def test_backend_project_loads_with_mlflows_loader():
    from mlflow.projects._project_spec import load_project

    project = load_project(str(BACKEND))
    assert project.docker_env == {"image": EXAMPLE_IMAGE}
    assert set(project._entry_points) == {"main", "lr_find", "compare", "study_plan", "study_member"}
    for entry in project._entry_points.values():
        assert all(
            p.default not in ("", None)
            for name, p in entry.parameters.items()
            if name not in STAGE_PARAMS.get(entry.name, {})
        )


@pytest.mark.parametrize("entry", ["main", "lr_find", "compare", "study_plan", "study_member"])
def test_the_job_mlflow_builds_from_the_backend_project_passes_kubernetes_validate(entry, tmp_path, mlflow_kubernetes):
    job = mlflow_job(mlflow_kubernetes, BACKEND, BACKEND / "job-template.yaml", entry)
    container = job["spec"]["template"]["spec"]["containers"][0]
    words = container["command"]
    assert words[:4] == ["torchrun", "--standalone", "--nproc-per-node", "1"]
    assert not [w for w in words if "'" in w or '"' in w], "a word would reach the job with its quotes"
    names = [var["name"] for var in container["env"]]
    assert len(names) == len(set(names)) and {"MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "PYTHONPATH"} <= set(names)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = kube_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the job's options ------------------------------------------------------------------------------------------


def job_command_lines() -> dict[str, list[str]]:
    """Every job command line the committed files hold, from `mlproject` on."""
    _, job = yaml.safe_load_all((KUBE / "indexed-job.yaml").read_text())
    trainjob = yaml.safe_load((KUBE / "trainjob.yaml").read_text())
    backend = yaml.safe_load((BACKEND / "MLproject").read_text())["entry_points"]
    script = SBATCH.read_text()
    srun = re.search(r"-m mlproject (.*?)\"\$@\"", script, flags=re.DOTALL).group(1)
    job_args = re.search(r"^JOB_ARGS=\((.*)\)$", script, flags=re.MULTILINE).group(1)
    lines = {
        "indexed-job": job["spec"]["template"]["spec"]["containers"][0]["command"],
        "trainjob": trainjob["spec"]["trainer"]["command"],
        "sbatch": ["-m", "mlproject", *srun.replace("\\\n", " ").split(), *job_args.split()],
        **{f"backend {name}": spec["command"].split() for name, spec in backend.items()},
    }
    return {name: words[words.index("mlproject") + 1 :] for name, words in lines.items()}


@pytest.mark.parametrize("name, words", job_command_lines().items(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_the_files_pass_is_one_of_the_jobs(name, words):
    command = job_cli.commands[words[0]]
    known = {opt for param in command.params for opt in param.opts}
    used = {w.split("=")[0] for w in words[1:] if w.startswith("--")}
    assert used - known <= PENDING_JOB_OPTIONS, f"{name}: the job has no {sorted(used - known - PENDING_JOB_OPTIONS)}"


# --- lr-finder deploy -------------------------------------------------------------------------------------------

BIG = ["--image", "registry.internal:5000/ml/lr-finder:abc123", "--nodes", "4", "--gpus-per-node", "8"]
BIG += ["--experiment", "nightly sweep", "-P", "epochs=8", "-P", "lr_steps=50"]


def test_deploy_indexed_job_is_valid_and_filled_in(tmp_path):
    args = ["--name", "big-run", "--namespace", "ml", "--secret", "team.mlflow", "--data-claim", "fashion-mnist"]
    result = deploy("kubernetes", *BIG, *args, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    path = tmp_path / "indexed-job.yaml"
    for version in KUBERNETES_VERSIONS:
        assert kube_validate(path, version).returncode == 0, kube_validate(path, version).stdout
    service, job = yaml.safe_load_all(path.read_text())
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "big-run"}
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (4, 4)
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:6] == [
        "torchrun", "--nnodes=4", "--nproc-per-node=8", "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=big-run-0.big-run", "--master-port=29500",
    ]  # fmt: skip
    assert command[command.index("--epochs") + 1] == "8" and command[-4:] == ["--devices", "8", "--num-nodes", "4"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    env = {var["name"]: var for var in container["env"]}
    assert env["MLFLOW_EXPERIMENT_NAME"]["value"] == "nightly sweep"
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "team.mlflow",
        "key": "MLFLOW_TRACKING_URI",
    }
    assert not [v for v in env.values() if v["name"].startswith("MLFLOW_TRACKING") and "value" in v]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]


def test_deploy_prints_one_manifest_to_stdout_for_kubectl_apply():
    result = deploy("kubernetes", "--image", EXAMPLE_IMAGE)
    assert result.exit_code == 0
    assert [doc["kind"] for doc in yaml.safe_load_all(result.stdout)] == ["Service", "Job"]


def test_deploy_trainjob_matches_the_crd(tmp_path, strict_schema):
    result = deploy("kubernetes", "--manifest", "trainjob", *BIG, "--data-claim", "fmnist", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    path = tmp_path / "trainjob.yaml"
    check = crd_validate(strict_schema, path)
    assert check.returncode == 0, check.stdout
    trainer = yaml.safe_load(path.read_text())["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["resourcesPerNode"]["limits"]) == (
        4, 8, {"nvidia.com/gpu": 8},
    )  # fmt: skip


def test_deploy_mlflow_backend_loads_and_builds_a_valid_job(tmp_path, mlflow_kubernetes):
    args = ["--manifest", "mlflow-backend", "--namespace", "ml", "-P", "epochs=8", "--gpus-per-node", "2"]
    result = deploy("kubernetes", "--image", "registry.example.com/lr-finder:v2", *args, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    folder = tmp_path / "mlflow-backend"
    config = json.loads((folder / "kubernetes_config.json").read_text())
    assert config["kube-job-template-path"] == str(folder / "job-template.yaml")
    job = mlflow_job(mlflow_kubernetes, folder, folder / "job-template.yaml", "main")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert job["metadata"]["namespace"] == "ml" and container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["command"][container["command"].index("--epochs") + 1] == "8"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert kube_validate(path).returncode == 0, kube_validate(path).stdout


def test_deploy_slurm_passes_shellcheck_and_is_filled_in(tmp_path):
    result = deploy("slurm", *BIG[:6], "--image", "/shared/containers/lr-finder.sqsh", "--time", "1-00:00:00",
                    "--experiment", "it's nightly", "-P", "epochs=8", "--out", str(tmp_path))  # fmt: skip
    assert result.exit_code == 0, result.output
    path = tmp_path / "lr-finder.sbatch"
    check = run(tool("shellcheck"), str(path))
    assert check.returncode == 0, check.stdout
    lines = path.read_text().splitlines()
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=1-00:00:00",
        "IMAGE=${LR_FINDER_IMAGE:-/shared/containers/lr-finder.sqsh}",
        "JOB_ARGS=(--auto-lr true --epochs 8)",
    ]:
        assert line in lines, line
    (default,) = [line for line in lines if line.startswith("export MLFLOW_EXPERIMENT_NAME=")]
    experiment = subprocess.run(
        ["bash", "-c", f'{default}; echo "$MLFLOW_EXPERIMENT_NAME"'], capture_output=True, text=True
    )
    assert experiment.stdout == "it's nightly\n"


@pytest.mark.parametrize(
    "args, option",
    [
        (["kubernetes", "--image", EXAMPLE_IMAGE, "--nodes", "0"], "--nodes"),
        (["kubernetes", "--image", EXAMPLE_IMAGE, "--gpus-per-node", "0"], "--gpus-per-node"),
        (["kubernetes", "--image", "Lr Finder"], "--image"),
        (["kubernetes", "--image", EXAMPLE_IMAGE, "--name", "Big_Run"], "--name"),
        (["kubernetes", "--image", EXAMPLE_IMAGE, "--secret", "my secret"], "--secret"),
        (["kubernetes", "--image", EXAMPLE_IMAGE, "--data-claim", "-x"], "--data-claim"),
        (["kubernetes", "--image", EXAMPLE_IMAGE, "-P", "epochs"], "-P"),
        (["kubernetes", "--image", EXAMPLE_IMAGE, "-P", "epoch=8"], "-P"),
        (["kubernetes", "--image", EXAMPLE_IMAGE, "-P", "devices=2"], "-P"),
        (["kubernetes", "--image", EXAMPLE_IMAGE, "-P", "epochs=eight"], "-P"),
        (["kubernetes", "--image", EXAMPLE_IMAGE, "--manifest", "mlflow-backend"], "--manifest"),
        (
            ["kubernetes", "--image", EXAMPLE_IMAGE, "--manifest", "mlflow-backend", "-P", "data_dir=/d", "--out", "x"],
            "-P",
        ),
        (["kubernetes", "--image", EXAMPLE_IMAGE, "--out", str(KUBE)], "--out"),
        (
            [
                "kubernetes",
                "--image",
                EXAMPLE_IMAGE,
                "--manifest",
                "mlflow-backend",
                "-e",
                "compare",
                "-P",
                "lrs=1e-5, 1e-4",
                "--out",
                "x",
            ],
            "-P",
        ),  # fmt: skip
        (["slurm", "--image", "/shared/lr finder.sqsh"], "--image"),
        (["slurm", "--image", "/shared/lr-finder.sqsh", "--time", "4h"], "--time"),
    ],
)
def test_bad_values_exit_2_with_one_error_line_naming_the_option(args, option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = deploy(*args)
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 2 and len(errors) == 1 and option in errors[0], result.output


def write_study(folder: Path) -> Path:
    study = folder / "study.json"
    study.write_text(json.dumps({"parent_run": RUN_ID, "members": ["lr=1e-05", "lr=0.1", "lr=finder"]}))
    return study


def test_study_gives_github_the_parent_run_and_the_members_as_job_outputs(tmp_path):
    result = deploy("study", "--study", str(write_study(tmp_path)), "--ci", "github")
    assert result.exit_code == 0
    assert result.stdout == f'parent_run={RUN_ID}\nmembers=["lr=1e-05", "lr=0.1", "lr=finder"]\n'


def test_study_gives_gitlab_a_valid_child_pipeline_with_one_job_per_member(tmp_path):
    study = write_study(tmp_path)
    result = deploy("study", "--study", str(study), "--ci", "gitlab", "--pipeline", str(REPO / ".gitlab-ci.yml"))
    assert result.exit_code == 0, result.output
    child = tmp_path / "child.yml"
    child.write_text(result.stdout)
    check = run(tool("check-jsonschema"), "--builtin-schema", "vendor.gitlab-ci", str(child))
    assert check.returncode == 0, check.stdout
    pipeline = yaml.safe_load(result.stdout)
    assert pipeline["variables"] == {"PARENT_RUN": RUN_ID}
    assert pipeline["study-member"]["parallel"]["matrix"] == [{"MEMBER": ["lr=1e-05", "lr=0.1", "lr=finder"]}]


@pytest.mark.parametrize(
    "content", ["{}", '{"parent_run": "x y", "members": ["a"]}', '{"parent_run": "abc", "members": []}', "["]
)
def test_a_broken_study_json_exits_2_naming_the_option(content, tmp_path):
    study = tmp_path / "study.json"
    study.write_text(content)
    result = deploy("study", "--study", str(study), "--ci", "github")
    assert result.exit_code == 2 and "--study" in result.output


@pytest.mark.parametrize("command", ["kubernetes", "slurm", "study"])
def test_every_option_has_help(command):
    group = cli.commands["deploy"]
    for param in group.commands[command].params:
        assert getattr(param, "help", None), f"deploy {command} {param.opts}"


# --- docs/deploy.md ---------------------------------------------------------------------------------------------


def doc_commands(prefix: str) -> list[list[str]]:
    """The documented command lines that start with prefix, continuation lines joined, up to a pipe."""
    text = (REPO / "docs" / "deploy.md").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(prefix)]
    return [shlex.split(line.split(" | ")[0]) for line in lines]


def test_docs_deploy_commands_run_as_written(tmp_path):
    commands = doc_commands("lr-finder deploy")
    assert len(commands) >= 5
    for words in commands:
        if "--out" in words:
            words[words.index("--out") + 1] = str(tmp_path / "out")
        if "--study" in words:
            continue  # needs a plan's study.json; run by tests/test_workflow.py
        result = CliRunner().invoke(cli, words[1:])
        assert result.exit_code == 0, (words, result.output)


def test_docs_name_only_files_that_exist():
    text = (REPO / "docs" / "deploy.md").read_text()
    for path in set(re.findall(r"(?:deploy|docs|\.github/workflows|tests)/[\w./-]*\w", text)):
        assert (REPO / path).exists(), path
