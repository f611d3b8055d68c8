"""`lr-finder server`: the command line it starts, the mistakes it refuses, and a real basic-auth server it runs."""

from __future__ import annotations

import socket

import pytest
from click.testing import CliRunner

from service import server
from service.cli import cli
from tests.helpers import AUTH_ENV, http_status, running_server

# --- the command line, decided without starting anything -----------------------------------------------------


def test_default_is_a_local_sqlite_server_with_proxied_artifacts():
    plan = server.plan(server.ServerOptions(), {}, "mlflow")
    assert plan.argv[:4] == ("mlflow", "server", "--backend-store-uri", "sqlite:///mlflow.db")
    assert "--serve-artifacts" in plan.argv
    assert plan.argv[plan.argv.index("--artifacts-destination") + 1] == "./mlartifacts"
    assert plan.argv[plan.argv.index("--host") + 1] == "127.0.0.1"
    assert plan.url == "http://127.0.0.1:5000" and plan.health_url == "http://127.0.0.1:5000/health"
    assert "--app-name" not in plan.argv
    assert plan.env == {server.JOBS_ENV: "false"}  # no GenAI job workers unless asked for
    assert server.plan(server.ServerOptions(job_execution=True), {}).env == {server.JOBS_ENV: "true"}


def test_sqlite_for_a_server_others_reach_warns_and_postgresql_does_not():
    assert not server.plan(server.ServerOptions(), {}).warnings  # one person on this machine: sqlite is right
    sqlite = server.plan(server.ServerOptions(host="10.0.0.5"), {})
    assert any("PostgreSQL" in w for w in sqlite.warnings)
    pg = server.plan(server.ServerOptions(backend_store_uri="postgresql://mlflow:s3cret@db:5432/mlflow", workers=8), {})
    assert not pg.warnings
    assert pg.argv[3] == "postgresql+psycopg2://mlflow:s3cret@db:5432/mlflow"  # the driver lr-finder[service] has
    assert pg.argv[pg.argv.index("--workers") + 1] == "8"


def test_postgresql_workers_share_eighty_connections_and_a_teams_own_pool_setting_wins():
    pg = "postgresql://mlflow@db:5432/mlflow"
    assert server.plan(server.ServerOptions(backend_store_uri=pg, workers=4), {}).env == {
        server.JOBS_ENV: "false",
        server.POOL_SIZE_ENV: "5",
        server.MAX_OVERFLOW_ENV: "15",  # 4 x (5 + 15) = 80
    }
    assert server.plan(server.ServerOptions(backend_store_uri=pg, workers=1), {}).env[server.MAX_OVERFLOW_ENV] == "75"
    assert server.plan(server.ServerOptions(backend_store_uri=pg, workers=16), {}).env[server.MAX_OVERFLOW_ENV] == "10"
    own = server.plan(server.ServerOptions(backend_store_uri=pg), {server.MAX_OVERFLOW_ENV: "50"}).env
    assert server.MAX_OVERFLOW_ENV not in own and own[server.POOL_SIZE_ENV] == "5"


def test_password_in_the_backend_uri_never_shows():
    plan = server.plan(server.ServerOptions(backend_store_uri="postgresql://mlflow:s3cret@db:5432/mlflow"), {})
    shown = server.display_argv(plan.argv)
    assert "s3cret" not in shown and "postgresql+psycopg2://mlflow:***@db:5432/mlflow" in shown


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "mysql://u@h/db", "/tmp/mlruns", "mlflow.db"])
def test_other_backends_are_refused_with_the_two_that_work(uri):
    with pytest.raises(server.ServerConfigError, match="sqlite:///FILE or postgresql://"):
        server.plan(server.ServerOptions(backend_store_uri=uri), {})


def test_listening_on_all_interfaces_answers_on_loopback_and_warns_without_auth():
    plan = server.plan(server.ServerOptions(host="0.0.0.0", port=8080), {})
    assert plan.health_url == "http://127.0.0.1:8080/health"
    assert any("basic-auth" in w for w in plan.warnings)
    team = server.ServerOptions(backend_store_uri="postgresql://u@db/mlflow", host="0.0.0.0", app_name="basic-auth")
    assert not server.plan(team, AUTH_ENV).warnings


def test_basic_auth_needs_a_secret_key_and_an_admin_password():
    options = server.ServerOptions(app_name="basic-auth")
    with pytest.raises(server.ServerConfigError, match=server.AUTH_SECRET_ENV):
        server.plan(options, {server.AUTH_PASSWORD_ENV: "x"})
    with pytest.raises(server.ServerConfigError, match=server.AUTH_PASSWORD_ENV):
        server.plan(options, {server.AUTH_SECRET_ENV: "x"})
    plan = server.plan(options, AUTH_ENV)
    assert plan.argv[-2:] == ("--app-name", "basic-auth")


def test_basic_auth_config_file_replaces_the_password_variable(tmp_path):
    ini = tmp_path / "auth.ini"
    ini.write_text("[mlflow]\n")
    plan = server.plan(server.ServerOptions(app_name="basic-auth", auth_config=str(ini)), {server.AUTH_SECRET_ENV: "x"})
    assert plan.env[server.AUTH_CONFIG_ENV] == str(ini.resolve())


def test_postgresql_and_basic_auth_name_the_packages_they_need():
    assert server.needed_modules(server.ServerOptions()) == {}
    pg = server.ServerOptions(backend_store_uri="postgresql+psycopg2://u@h/db", app_name="basic-auth")
    assert server.needed_modules(pg) == {"psycopg2": "psycopg2-binary", "flask_wtf": "Flask-WTF"}
    bare = server.ServerOptions(backend_store_uri="postgresql://u@h/db")
    assert server.needed_modules(bare) == {"psycopg2": "psycopg2-binary"}
    assert server.needed_modules(server.ServerOptions(backend_store_uri="postgresql+psycopg://u@h/db")) == {
        "psycopg": "psycopg[binary]"
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend-store-uri", "file:///tmp/x"], "postgresql://"),
        (["--app-name", "basic-auth"], server.AUTH_SECRET_ENV),
        (["--port", "0"], "--port"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_cli_refuses_a_server_that_could_not_work_before_starting_it(args, message, monkeypatch):
    for name in (server.AUTH_SECRET_ENV, server.AUTH_PASSWORD_ENV):
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
        assert http_status(srv.url + search, "admin", AUTH_ENV[server.AUTH_PASSWORD_ENV]) == 200
        started = srv
    assert started.process.returncode == 0
    assert "lr-finder server: stopped" in started.log_text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(started.url.rsplit(":", 1)[1])), timeout=2).close()
