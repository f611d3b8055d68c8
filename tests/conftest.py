"""Fixtures, and how the suite shares a machine; the helpers the tests share live in tests/helpers.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service import server
from tests.helpers import AUTH_ENV, running_server, write_dataset

# The files that take longest, first: with `-n 2 --dist loadfile` (.ci/run) each worker takes whole files in this
# order, and a long file started last would leave the other worker idle at the end (docs/testing.md has the times).
LONGEST_FIRST = (
    "test_docker.py", "test_faults.py", "test_server_load.py", "test_user_code.py", "test_ddp.py",
    "test_their_code.py", "test_study.py", "test_ui_browser.py", "test_e2e.py", "test_one_line.py", "test_verify.py",
    "test_visible.py", "test_lr_free.py", "test_report_faults.py", "test_server_faults.py", "test_exits.py",
    "test_pipeline.py", "test_host_side.py", "test_server_cli.py", "test_cli.py", "test_benchmarks.py",
    "test_install.py",
)  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    """A worker of several (pytest-xdist) keeps to its own share of the CPUs, and so does every process it starts:
    the jobs of two workers never spin their threads on each other's cores."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cpus = sorted(os.sched_getaffinity(0))
    if worker.startswith("gw") and 1 < count <= len(cpus):
        os.sched_setaffinity(0, cpus[int(worker[2:]) % count :: count])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: each file's own order stays


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "tiny")


@dataclass(frozen=True)
class TeamServer:
    """A team's tracking server: `lr-finder server` with basic auth, an admin and their password."""

    url: str
    user: str
    password: str

    def env(self) -> dict[str, str]:
        """The credentials as the job and MLflow's client read them."""
        return {"MLFLOW_TRACKING_USERNAME": self.user, "MLFLOW_TRACKING_PASSWORD": self.password}

    def with_credentials(self, user: str = "", password: str = "") -> str:
        return self.url.replace("http://", f"http://{user or self.user}:{password or self.password}@")


@pytest.fixture(scope="session")
def team_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamServer]:
    """One server for the tests that only need somewhere to log, each in experiments of its own: a server takes
    20 s to answer on 2 cores. Tests of the server itself start their own."""
    folder = tmp_path_factory.mktemp("team-server")
    uri = f"sqlite:///{folder}/mlflow.db"
    # One worker process: one test at a time writes to it, and each worker costs seconds of imports to start.
    with running_server(folder, uri, "--app-name", "basic-auth", "--workers", "1", env=AUTH_ENV) as srv:
        yield TeamServer(srv.url, "admin", AUTH_ENV[server.AUTH_PASSWORD_ENV])
