"""One name per parameter: MLproject = click option = JobConfig field; conda.yaml pins = pyproject pins."""

import dataclasses
import re
import tomllib

import pytest
import yaml
from click.testing import CliRunner

from mlproject.__main__ import cli
from mlproject.config import JobConfig, field_names
from tests.helpers import REPO

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


@pytest.mark.parametrize("entry, command", [("main", "train"), ("lr_find", "lr-find"), ("compare", "compare")])
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


def _pins(lines):
    return dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", s.strip()).groups() for s in lines if "==" in s)


def test_conda_env_and_pyproject_pin_the_same_versions():
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert _pins(pip_section) == _pins(pyproject["project"]["dependencies"])
