"""One name per parameter: MLproject = click option = JobConfig field. One tested version per package:
constraints.txt, within pyproject.toml's ranges, installed exactly by conda.yaml and the Dockerfile."""

import dataclasses
import re
import tomllib

import pytest
import yaml
from click.testing import CliRunner
from packaging.requirements import Requirement

from mlproject.__main__ import cli
from mlproject.config import JobConfig, field_names
from tests.helpers import LOCK, REPO, canonical, lock_pins, requirements

MLPROJECT = yaml.safe_load((REPO / "MLproject").read_text())
ENTRY_POINTS = MLPROJECT["entry_points"]


@pytest.mark.parametrize(
    "entry, defaults", [("main", JobConfig()), ("lr_find", JobConfig()), ("compare", JobConfig(auto_lr=True))]
)
def test_every_entry_point_declares_every_config_field_with_its_default(entry, defaults):
    params = {k: v for k, v in ENTRY_POINTS[entry]["parameters"].items() if k in field_names()}
    assert tuple(params) == field_names()
    for f in dataclasses.fields(JobConfig):
        declared = params[f.name]["default"]
        assert str(declared).lower() == defaults.as_params()[f.name].lower() or (
            f.type == "float" and float(declared) == getattr(defaults, f.name)
        ), f.name


@pytest.mark.parametrize(
    "entry, command", [("main", "train"), ("lr_find", "lr-find"), ("compare", "compare"), ("config", "train")]
)
def test_entry_points_pass_every_parameter_to_the_same_named_option(entry, command):
    spec = ENTRY_POINTS[entry]
    line = spec["command"]
    assert line.startswith(f"python -m mlproject {command} ")
    passed = dict(re.findall(r"--([a-z-]+) \{([a-z_]+)\}", line))
    assert set(passed.values()) == set(spec["parameters"])
    assert all(option == name.replace("_", "-") for option, name in passed.items())
    click_options = {p.name for p in cli.commands[command].params}
    assert set(spec["parameters"]) <= click_options


def test_help_documents_every_option():
    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    for name in field_names():
        assert "--" + name.replace("_", "-") in result.output


def _declared() -> list[Requirement]:
    """Every requirement pyproject.toml states, the base install's and each extra's (not the extras it includes)."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    found = [Requirement(text) for extra in ("", *extras) for text in requirements(extra)]
    return [r for r in found if canonical(r.name) != "lr-finder"]


def test_the_lock_pins_one_exact_version_per_line():
    for line in LOCK.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        assert not requirement or re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.+!]*", requirement), line
    assert len(lock_pins()) == len([x for x in LOCK.read_text().splitlines() if x.split("#", 1)[0].strip()])


def test_every_package_pyproject_names_has_its_tested_version_in_the_lock_within_the_range():
    pins = lock_pins()
    for requirement in _declared():
        name = canonical(requirement.name)
        assert name in pins, f"{requirement.name}: no tested version in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} not {requirement}"
    assert set(pins) == {canonical(r.name) for r in _declared()}, "constraints.txt pins a package nothing asks for"


def test_the_host_install_needs_no_torch():
    assert {canonical(Requirement(r).name) for r in requirements()} == {"click", "docker", "mlflow-skinny"}


def _conda_pins() -> dict[str, str]:
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    return {canonical(name): version for name, version in (line.split("==") for line in pip_section)}


def test_conda_env_installs_the_job_extra_at_the_locks_versions():
    pins = lock_pins()
    job = {canonical(Requirement(r).name) for r in requirements("job")}
    assert _conda_pins() == {name: pins[name] for name in job}


def test_dockerfile_installs_the_job_extra_at_the_locks_versions():
    dockerfile = (REPO / "Dockerfile").read_text()
    pins = lock_pins()
    for arg, package in (("TORCH_VERSION", "torch"), ("TORCHVISION_VERSION", "torchvision")):
        assert re.search(rf"^ARG {arg}={re.escape(pins[package])}$", dockerfile, flags=re.MULTILINE), (arg, package)
    assert 'project["optional-dependencies"]["job"]' in dockerfile
    assert "pip install -c /tmp/lock/constraints.txt -r /tmp/lock/job.txt" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert {"!pyproject.toml", "!constraints.txt"} <= set(ignored), "the build context carries both"


def test_the_config_entry_point_takes_a_file_and_a_code_folder_alone():
    """MLflow logs an entry point's parameters before the job starts, and params are write-once: with these two
    alone, the params of a config file's run are what the file set (tests/test_user_code.py runs one)."""
    assert set(ENTRY_POINTS["config"]["parameters"]) == {"config", "code"}
    assert "default" not in ENTRY_POINTS["config"]["parameters"]["config"]  # mlflow run asks for it
