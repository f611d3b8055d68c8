"""Installing the package as its users do: the host side alone into a clean virtual environment (no torch), and
the setup scripts CI runs, checked by shellcheck."""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from mlproject import __version__
from tests.helpers import LOCK, REPO


def run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def host_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with `pip install -c constraints.txt .`: what a CI runner or laptop that only
    launches containers installs."""
    folder = tmp_path_factory.mktemp("host") / "venv"
    venv.create(folder, with_pip=True)
    # A copy of the checkout: pip's build writes build/ and *.egg-info next to the sources.
    source = tmp_path_factory.mktemp("source") / "lr-finder"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "__pycache__"))
    done = run(folder / "bin" / "pip", "install", "-q", "-c", LOCK, source, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "bin"


@pytest.mark.slow
def test_the_host_install_has_every_host_command_and_no_torch(host_env):
    result = run(host_env / "lr-finder", "--help")
    assert result.returncode == 0, result.stderr
    for command in ("build", "run", "doctor", "server", "report"):
        assert f"  {command} " in result.stdout, command
    report = run(host_env / "lr-finder", "report", "--help")
    assert report.returncode == 0 and "--experiment" in report.stdout, report.stderr
    assert run(host_env / "lr-finder", "--version").stdout == f"lr-finder {__version__}\n"
    for heavy in ("torch", "torchvision", "pytorch_lightning", "lightning", "matplotlib"):
        found = run(host_env / "python", "-c", f"import {heavy}")
        assert found.returncode != 0 and "ModuleNotFoundError" in found.stderr, heavy


@pytest.mark.slow
def test_the_host_install_takes_the_locks_versions(host_env):
    frozen = run(host_env / "pip", "freeze").stdout
    for line in LOCK.read_text().splitlines():
        pin = line.split("#", 1)[0].strip()
        if pin.split("==")[0] in ("click", "docker", "mlflow-skinny"):
            assert pin in frozen.splitlines(), pin


def test_the_setup_scripts_pass_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed: bash .ci/setup --tests installs it")
    scripts = [REPO / ".ci" / "setup", REPO / ".ci" / "run"]
    result = run("shellcheck", *scripts)
    assert result.returncode == 0, result.stdout
