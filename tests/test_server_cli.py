"""`lr-finder server`: the command line it starts, the mistakes it refuses, and a real basic-auth server it runs.

Also the helpers the load and browser tests share: a running `lr-finder server`, and training jobs against it.
"""

from __future__ import annotations

import base64
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from service import server as S
from service.cli import cli

BIN = Path(sys.executable).parent
AUTH_ENV = {S.AUTH_SECRET_ENV: "test-secret", S.AUTH_PASSWORD_ENV: "Admin-pass-2026!"}


# --- helpers shared with test_server_load.py and test_ui_browser.py -------------------------------------------


def free_port() -> int:
    """A loopback port free now, below Linux's ephemeral range (32768 up): a server binds it seconds later, and
    meanwhile no outgoing connection can be handed it as its source port."""
    for port in random.Random().sample(range(20000, 32768), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free loopback port in 20000-32767")


@dataclass(frozen=True)
class RunningServer:
    url: str
    log: Path
    process: subprocess.Popen[bytes]
    startup_s: float

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_server(
    folder: Path, backend_uri: str, *options: str, env: dict[str, str] | None = None, wait_s: float = 240
) -> Iterator[RunningServer]:
    """`lr-finder server` as a team member starts it, on a free loopback port; stopped with SIGTERM at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), folder / "server.log"
    args = [str(BIN / "lr-finder"), "server", "--backend-store-uri", backend_uri, "--port", str(port)]
    args += ["--artifacts-destination", str(folder / "artifacts"), "--wait", str(wait_s), *options]
    began = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, cwd=folder, env={**os.environ, **(env or {})}
        )
    try:
        while "lr-finder server: ready at" not in log.read_text(errors="replace"):
            assert process.poll() is None, f"lr-finder server exited {process.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() - began < wait_s + 10, "lr-finder server never said it was ready"
            time.sleep(0.5)
        yield RunningServer(f"http://127.0.0.1:{port}", log, process, time.monotonic() - began)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


@dataclass(frozen=True)
class JobResult:
    code: int
    output: str
    seconds: float


def run_jobs(
    tracking_uri: str, experiment: str, jobs: Sequence[Sequence[str]], folder: Path, timeout_s: float
) -> list[JobResult]:
    """Start every `python -m mlproject ARGS` at once against the tracking URI; wait for all (bounded)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_EXPERIMENT_NAME": experiment}
    env["OMP_NUM_THREADS"] = "1"  # eight jobs share two cores: one thread each avoids oversubscription
    env.pop("MLFLOW_RUN_ID", None)
    began, started = time.monotonic(), []
    for i, args in enumerate(jobs):
        with (folder / f"job{i}.log").open("wb") as out:
            cmd = [sys.executable, "-m", "mlproject", *args]
            started.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=folder, env=env))
    results = []
    for i, process in enumerate(started):
        remaining = max(1.0, timeout_s - (time.monotonic() - began))
        try:
            code = process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        output = (folder / f"job{i}.log").read_text(errors="replace")
        results.append(JobResult(code, output, time.monotonic() - began))
    return results


def http_status(url: str, user: str = "", password: str = "") -> int:
    request = urllib.request.Request(url)
    if user:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


# --- the command line, decided without starting anything -----------------------------------------------------


def test_default_is_a_local_sqlite_server_with_proxied_artifacts():
    plan = S.plan(S.ServerOptions(), {}, "mlflow")
    assert plan.argv[:4] == ("mlflow", "server", "--backend-store-uri", "sqlite:///mlflow.db")
    assert "--serve-artifacts" in plan.argv
    assert plan.argv[plan.argv.index("--artifacts-destination") + 1] == "./mlartifacts"
    assert plan.argv[plan.argv.index("--host") + 1] == "127.0.0.1"
    assert plan.url == "http://127.0.0.1:5000" and plan.health_url == "http://127.0.0.1:5000/health"
    assert "--app-name" not in plan.argv
    assert plan.env == {S.JOBS_ENV: "false"}  # no GenAI job workers unless asked for
    assert S.plan(S.ServerOptions(job_execution=True), {}).env == {S.JOBS_ENV: "true"}


def test_sqlite_for_a_server_others_reach_warns_and_postgresql_does_not():
    assert not S.plan(S.ServerOptions(), {}).warnings  # one person on this machine: sqlite is right
    sqlite = S.plan(S.ServerOptions(host="10.0.0.5"), {})
    assert any("PostgreSQL" in w for w in sqlite.warnings)
    pg = S.plan(S.ServerOptions(backend_store_uri="postgresql://mlflow:s3cret@db:5432/mlflow", workers=8), {})
    assert not pg.warnings
    assert pg.argv[3] == "postgresql+psycopg2://mlflow:s3cret@db:5432/mlflow"  # the driver lr-finder[service] has
    assert pg.argv[pg.argv.index("--workers") + 1] == "8"


def test_postgresql_workers_share_eighty_connections_and_a_teams_own_pool_setting_wins():
    pg = "postgresql://mlflow@db:5432/mlflow"
    assert S.plan(S.ServerOptions(backend_store_uri=pg, workers=4), {}).env == {
        S.JOBS_ENV: "false",
        S.POOL_SIZE_ENV: "5",
        S.MAX_OVERFLOW_ENV: "15",  # 4 x (5 + 15) = 80
    }
    assert S.plan(S.ServerOptions(backend_store_uri=pg, workers=1), {}).env[S.MAX_OVERFLOW_ENV] == "75"
    assert S.plan(S.ServerOptions(backend_store_uri=pg, workers=16), {}).env[S.MAX_OVERFLOW_ENV] == "10"
    own = S.plan(S.ServerOptions(backend_store_uri=pg), {S.MAX_OVERFLOW_ENV: "50"}).env
    assert S.MAX_OVERFLOW_ENV not in own and own[S.POOL_SIZE_ENV] == "5"


def test_password_in_the_backend_uri_never_shows():
    plan = S.plan(S.ServerOptions(backend_store_uri="postgresql://mlflow:s3cret@db:5432/mlflow"), {})
    shown = S.display_argv(plan.argv)
    assert "s3cret" not in shown and "postgresql+psycopg2://mlflow:***@db:5432/mlflow" in shown


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "mysql://u@h/db", "/tmp/mlruns", "mlflow.db"])
def test_other_backends_are_refused_with_the_two_that_work(uri):
    with pytest.raises(S.ServerConfigError, match="sqlite:///FILE or postgresql://"):
        S.plan(S.ServerOptions(backend_store_uri=uri), {})


def test_listening_on_all_interfaces_answers_on_loopback_and_warns_without_auth():
    plan = S.plan(S.ServerOptions(host="0.0.0.0", port=8080), {})
    assert plan.health_url == "http://127.0.0.1:8080/health"
    assert any("basic-auth" in w for w in plan.warnings)
    team = S.ServerOptions(backend_store_uri="postgresql://u@db/mlflow", host="0.0.0.0", app_name="basic-auth")
    assert not S.plan(team, AUTH_ENV).warnings


def test_basic_auth_needs_a_secret_key_and_an_admin_password():
    options = S.ServerOptions(app_name="basic-auth")
    with pytest.raises(S.ServerConfigError, match=S.AUTH_SECRET_ENV):
        S.plan(options, {S.AUTH_PASSWORD_ENV: "x"})
    with pytest.raises(S.ServerConfigError, match=S.AUTH_PASSWORD_ENV):
        S.plan(options, {S.AUTH_SECRET_ENV: "x"})
    plan = S.plan(options, AUTH_ENV)
    assert plan.argv[-2:] == ("--app-name", "basic-auth")


def test_basic_auth_config_file_replaces_the_password_variable(tmp_path):
    ini = tmp_path / "auth.ini"
    ini.write_text("[mlflow]\n")
    plan = S.plan(S.ServerOptions(app_name="basic-auth", auth_config=str(ini)), {S.AUTH_SECRET_ENV: "x"})
    assert plan.env[S.AUTH_CONFIG_ENV] == str(ini.resolve())


def test_postgresql_and_basic_auth_name_the_packages_they_need():
    assert S.needed_modules(S.ServerOptions()) == {}
    pg = S.ServerOptions(backend_store_uri="postgresql+psycopg2://u@h/db", app_name="basic-auth")
    assert S.needed_modules(pg) == {"psycopg2": "psycopg2-binary", "flask_wtf": "Flask-WTF"}
    assert S.needed_modules(S.ServerOptions(backend_store_uri="postgresql://u@h/db")) == {"psycopg2": "psycopg2-binary"}
    assert S.needed_modules(S.ServerOptions(backend_store_uri="postgresql+psycopg://u@h/db")) == {
        "psycopg": "psycopg[binary]"
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend-store-uri", "file:///tmp/x"], "postgresql://"),
        (["--app-name", "basic-auth"], S.AUTH_SECRET_ENV),
        (["--port", "0"], "--port"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_cli_refuses_a_server_that_could_not_work_before_starting_it(args, message, monkeypatch):
    for name in (S.AUTH_SECRET_ENV, S.AUTH_PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli, ["server", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "starting:" not in result.output


# --- a real server ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_basic_auth_server_refuses_anonymous_clients_and_stops_on_sigterm(tmp_path):
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    with running_server(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", "--app-name", "basic-auth", env=AUTH_ENV) as srv:
        assert http_status(srv.url + search) == 401
        assert http_status(srv.url + search, "admin", "wrong") == 401
        assert http_status(srv.url + search, "admin", AUTH_ENV[S.AUTH_PASSWORD_ENV]) == 200
        server = srv
    assert server.process.returncode == 0
    assert "lr-finder server: stopped" in server.log_text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=2).close()
