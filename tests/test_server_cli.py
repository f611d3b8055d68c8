"""`lr-finder server`: the command line it starts, the mistakes it refuses, and a real basic-auth server it runs."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from service import server, server_process, uris
from service.cli import cli
from tests.helpers import AUTH_ENV, free_port, http_answering, http_status, running_server

# --- the command line, decided without starting anything -----------------------------------------------------


def test_default_is_a_local_sqlite_server_with_proxied_artifacts():
    plan = server.plan(server.ServerOptions(), {}, "mlflow")
    assert plan.argv[:3] == ("mlflow", "server", "--serve-artifacts")
    assert plan.env[server.BACKEND_URI_ENV] == "sqlite:///mlflow.db"
    assert plan.env[server.ARTIFACTS_ENV] == "./mlartifacts"
    assert plan.argv[plan.argv.index("--host") + 1] == "127.0.0.1"
    assert plan.url == "http://127.0.0.1:5000" and plan.health_url == "http://127.0.0.1:5000/health"
    assert "--app-name" not in plan.argv
    assert plan.env[server.JOBS_ENV] == "false"  # no GenAI job workers unless asked for
    assert server.plan(server.ServerOptions(job_execution=True), {}).env[server.JOBS_ENV] == "true"


def test_sqlite_for_a_server_others_reach_warns_and_postgresql_does_not():
    assert not server.plan(server.ServerOptions(), {}).warnings  # one person on this machine: sqlite is right
    sqlite = server.plan(server.ServerOptions(host="10.0.0.5"), {})
    assert any("PostgreSQL" in w for w in sqlite.warnings)
    pg = server.plan(server.ServerOptions(backend_store_uri="postgresql://mlflow:s3cret@db:5432/mlflow", workers=8), {})
    assert not pg.warnings
    assert pg.env[server.BACKEND_URI_ENV] == "postgresql+psycopg2://mlflow:s3cret@db:5432/mlflow"  # the driver we ship
    assert pg.argv[pg.argv.index("--workers") + 1] == "8"


def test_postgresql_workers_share_eighty_connections_and_a_teams_own_pool_setting_wins():
    pg = "postgresql://mlflow@db:5432/mlflow"
    env = server.plan(server.ServerOptions(backend_store_uri=pg, workers=4), {}).env
    assert (env[server.POOL_SIZE_ENV], env[server.MAX_OVERFLOW_ENV]) == ("5", "15")  # 4 x (5 + 15) = 80
    assert server.plan(server.ServerOptions(backend_store_uri=pg, workers=1), {}).env[server.MAX_OVERFLOW_ENV] == "75"
    assert server.plan(server.ServerOptions(backend_store_uri=pg, workers=16), {}).env[server.MAX_OVERFLOW_ENV] == "10"
    own = server.plan(server.ServerOptions(backend_store_uri=pg), {server.MAX_OVERFLOW_ENV: "50"}).env
    assert server.MAX_OVERFLOW_ENV not in own and own[server.POOL_SIZE_ENV] == "5"


@pytest.mark.parametrize(
    "uri",
    [
        "postgresql://mlflow:s3cret@db:5432/mlflow",
        "postgresql://mlflow:s3/cr@t@db:5432/mlflow",  # a raw / or @ in a password
        "postgresql://mlflow@db:5432/mlflow?password=s3cret&sslmode=require",  # libpq's own spelling
    ],
)
def test_a_password_in_the_backend_uri_goes_to_the_servers_environment_and_never_shows(uri):
    plan = server.plan(server.ServerOptions(backend_store_uri=uri), {})
    assert not any("s3" in arg for arg in plan.argv)  # argv: what `ps` shows every user
    assert "s3" not in plan.shown and "s3" not in repr(plan)
    assert "(backend store postgresql+psycopg2://db:5432/mlflow," in plan.shown
    assert uris.has_password(uri)
    assert not uris.has_password("postgresql://mlflow@db/mlflow") and not uris.has_password("sqlite:///x.db")


def test_shown_uris_keep_what_locates_the_store():
    assert uris.where("sqlite:////srv/mlflow/mlflow.db") == "sqlite:////srv/mlflow/mlflow.db"
    assert uris.where("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    assert uris.where("s3://bucket/path") == "s3://bucket/path"
    assert uris.where("http://admin:pw@[::1]:5000/") == "http://[::1]:5000/"
    assert uris.where("./mlartifacts") == "./mlartifacts"


def test_the_uri_file_gives_its_first_line():
    assert server.uri_from_file("\n  postgresql://u:p@h/db  \nignored\n", "f") == "postgresql://u:p@h/db"
    with pytest.raises(server.ServerConfigError, match="f is empty") as caught:
        server.uri_from_file("\n \n", "f")
    assert caught.value.option == "--backend-store-uri-file"


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "mysql://u@h/db", "/tmp/mlruns", "mlflow.db"])
def test_other_backends_are_refused_with_the_two_that_work(uri):
    with pytest.raises(server.ServerConfigError, match="sqlite:///FILE or postgresql://"):
        server.plan(server.ServerOptions(backend_store_uri=uri), {})


@pytest.mark.parametrize(
    "host, listens, answers",
    [
        ("0.0.0.0", "0.0.0.0", "http://127.0.0.1:8080"),
        ("::", "::", "http://[::1]:8080"),
        ("[::]", "::", "http://[::1]:8080"),
        ("[::1]", "::1", "http://[::1]:8080"),
        ("::1", "::1", "http://[::1]:8080"),
        ("[2001:db8:0::1]", "2001:db8::1", "http://[2001:db8::1]:8080"),
        ("localhost", "localhost", "http://localhost:8080"),
        ("mlflow.team.internal", "mlflow.team.internal", "http://mlflow.team.internal:8080"),
    ],
)
def test_hosts_ipv6_with_or_without_brackets_listen_plain_and_answer_bracketed(host, listens, answers):
    plan = server.plan(server.ServerOptions(host=host, port=8080), {})
    assert plan.argv[plan.argv.index("--host") + 1] == listens == plan.host
    assert plan.url == answers and plan.health_url == answers + "/health"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "10.0.0.5", "192.168.1.20", "mlflow.team.internal"])
def test_every_host_beyond_loopback_warns_without_auth(host):
    assert any("without --app-name basic-auth" in w for w in server.plan(server.ServerOptions(host=host), {}).warnings)
    team = server.ServerOptions(backend_store_uri="postgresql://u@db/mlflow", host=host, app_name="basic-auth")
    assert not server.plan(team, AUTH_ENV).warnings


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST."])
def test_loopback_hosts_do_not_warn(host):
    assert not server.plan(server.ServerOptions(host=host), {}).warnings


@pytest.mark.parametrize(
    "host", ["", "a b", "http://x", "[1.2.3.4]", "300.1.1.1", "1.2.3", "::::1::", "[::1", "-x", "x_y"]
)
def test_hosts_that_are_no_address_are_refused_naming_the_option(host):
    with pytest.raises(server.ServerConfigError, match="IPv6 with or without brackets") as caught:
        server.plan(server.ServerOptions(host=host), {})
    assert caught.value.option == "--host"


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


def extra(options: server.ServerOptions) -> dict[str, str]:
    """What this server needs beyond `mlflow server` itself."""
    return {k: v for k, v in server.needed_modules(options).items() if k not in server.SERVER_MODULES}


def test_postgresql_and_basic_auth_name_the_packages_they_need():
    assert server.needed_modules(server.ServerOptions()) == server.SERVER_MODULES
    assert {"flask", "sqlalchemy"} <= set(server.SERVER_MODULES)  # what mlflow-skinny lacks for `mlflow server`
    pg = server.ServerOptions(backend_store_uri="postgresql+psycopg2://u@h/db", app_name="basic-auth")
    assert extra(pg) == {"psycopg2": "psycopg2-binary", "flask_wtf": "Flask-WTF"}
    assert extra(server.ServerOptions(backend_store_uri="postgresql://u@h/db")) == {"psycopg2": "psycopg2-binary"}
    psycopg3 = server.ServerOptions(backend_store_uri="postgresql+psycopg://u@h/db")
    assert extra(psycopg3) == {"psycopg": "psycopg[binary]"}
    assert extra(server.ServerOptions(job_execution=True)) == {"huey": "mlflow"}


def test_a_host_install_without_mlflows_server_packages_is_told_the_extra_in_one_line(monkeypatch):
    for module in ("flask", "flask_wtf"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: find_spec answers None
    args = ["server", "--app-name", "basic-auth", "--port", str(free_port())]
    result = CliRunner().invoke(cli, args, env={**AUTH_ENV, server.BACKEND_URI_ENV: None})
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "Error: lr-finder server needs Flask-WTF, mlflow, not installed here: pip install 'lr-finder[server]'"
    ]


@pytest.mark.parametrize(
    "args, option, message",
    [
        (["--backend-store-uri", "file:///tmp/x"], "--backend-store-uri", "postgresql://"),
        (["--backend-store-uri", "mysql://u:s3cret@h/db"], "--backend-store-uri", "'mysql://h/db'"),
        (["--app-name", "basic-auth"], "--app-name", server.AUTH_SECRET_ENV),
        (["--port", "0"], "--port", "1<=x<=65535"),
        (["--workers", "0"], "--workers", "1<=x<=64"),
        (["--host", "[::]]"], "--host", "IPv6 with or without brackets"),
        (["--host", "http://0.0.0.0"], "--host", "IPv6 with or without brackets"),
        (["--host", "no-such-host.invalid"], "--host", "no such host"),
        (["--host", "192.0.2.1"], "--host", "no address of this machine"),  # TEST-NET-1: never this machine's
        (["--backend-store-uri-file", "/nonexistent/uri"], "--backend-store-uri-file", "does not exist"),
    ],
)
def test_cli_refuses_a_server_that_could_not_work_before_starting_it(args, option, message, monkeypatch):
    for name in (server.AUTH_SECRET_ENV, server.AUTH_PASSWORD_ENV, server.BACKEND_URI_ENV):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(
        cli, ["server", *args, "--port", str(free_port())] if "--port" not in args else ["server", *args]
    )
    assert result.exit_code == 2, result.output
    (error,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert option in error and message in error
    assert "starting:" not in result.output and "Traceback" not in result.output and "s3cret" not in result.output


def refused_for_its_port(*args: str, env: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """`lr-finder server ARGS` on a port a tiny HTTP server holds: it stops before starting anything.
    Returns the port and the output's lines."""
    with http_answering(200, b"OK") as url:
        port = url.rsplit(":", 1)[1]
        clean = {name: None for name in (server.BACKEND_URI_ENV, server.ARTIFACTS_ENV)}
        result = CliRunner().invoke(cli, ["server", *args, "--port", port], env={**clean, **(env or {})})
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: port {port} on 127.0.0.1 is in use by another process: stop it or choose another --port"
    )
    assert "starting:" not in result.output
    return port, result.output.splitlines()


def test_a_password_typed_on_the_command_line_is_warned_about_and_never_echoed():
    _, lines = refused_for_its_port("--backend-store-uri", "postgresql://u:s3cret@127.0.0.1/db")
    assert any(
        line.startswith("warning: --backend-store-uri holds a password") and server.BACKEND_URI_ENV in line
        for line in lines
    )
    assert not any("s3cret" in line for line in lines)


def test_the_backend_uri_comes_from_the_environment_or_a_private_file_without_a_warning(tmp_path):
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"")
    store.chmod(0o644)  # made before lr-finder kept its files private: named, so the URI's source is seen
    uri = f"sqlite:///{store}"
    _, lines = refused_for_its_port(env={server.BACKEND_URI_ENV: uri})
    assert f"warning: {store} is readable by other users (mode 644): chmod 600 {store}" in lines
    secret = tmp_path / "backend-uri"
    secret.write_text(uri + "\n")
    secret.chmod(0o600)
    _, lines = refused_for_its_port("--backend-store-uri-file", str(secret), env={server.BACKEND_URI_ENV: "x://y"})
    assert f"warning: {store} is readable by other users (mode 644): chmod 600 {store}" in lines  # the file won
    assert not any("holds a password" in line or str(secret) in line for line in lines)
    secret.chmod(0o644)
    _, lines = refused_for_its_port("--backend-store-uri-file", str(secret))
    assert f"warning: {secret} is readable by other users (mode 644): chmod 600 {secret}" in lines


def test_the_uri_typed_and_in_a_file_at_once_is_refused(tmp_path):
    secret = tmp_path / "backend-uri"
    secret.write_text("sqlite:///x.db\n")
    args = ["server", "--backend-store-uri", "sqlite:///y.db", "--backend-store-uri-file", str(secret)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        "Error: Invalid value for --backend-store-uri-file: give the URI once: here or in --backend-store-uri"
    )


def test_an_empty_uri_file_is_refused(tmp_path):
    secret = tmp_path / "backend-uri"
    secret.write_text("\n")
    result = CliRunner().invoke(cli, ["server", "--backend-store-uri-file", str(secret)])
    assert result.exit_code == 2 and f"{secret} is empty" in result.output.splitlines()[-1]


def test_how_a_process_ended_reads_as_its_exit_code_or_signal():
    assert server_process.exit_reason(0) == "exit code 0"
    assert server_process.exit_reason(1) == "exit code 1"
    assert server_process.exit_reason(-9) == "killed by SIGKILL"


def test_listeners_on_a_port_are_read_from_proc_net_tcp():
    table = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0\n"
        "   1: 0100007F:1388 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0\n"
        "   2: 00000000:1389 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0\n"
    )
    assert server_process.listening_inodes(table, 5000) == {4242}  # 0x1388; the connection (state 01) is no listener
    assert server_process.listening_inodes(table, 5001) == {4444}
    assert server_process.listening_inodes(table, 5002) == set()


def test_only_the_servers_own_files_are_checked_for_their_mode():
    options = server.ServerOptions(backend_store_uri="sqlite:////srv/m.db", artifacts_destination="/srv/a")
    assert server.private_paths(options) == [Path("/srv/m.db"), Path("/srv/a")]
    auth = server.ServerOptions(artifacts_destination="s3://bucket/a", app_name="basic-auth")
    assert server.private_paths(auth) == [Path("mlflow.db"), Path("basic_auth.db")]
    assert server.exposed(0o100644) and server.exposed(0o40750) and not server.exposed(0o100600)


# --- a real server ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_basic_auth_server_refuses_anonymous_clients_keeps_its_files_private_and_stops_on_sigterm(
    tmp_path, monkeypatch
):
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    password = AUTH_ENV[server.AUTH_PASSWORD_ENV]
    with running_server(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", "--app-name", "basic-auth", env=AUTH_ENV) as srv:
        assert http_status(srv.url + search) == 401
        assert http_status(srv.url + search, "admin", "wrong") == 401
        assert http_status(srv.url + search, "admin", password) == 200
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = MlflowClient(srv.url)
        (tmp_path / "note.txt").write_text("uploaded through the server")
        client.log_artifact(client.create_run(client.create_experiment("private")).info.run_id, tmp_path / "note.txt")
        started = srv
    assert started.process.returncode == 0
    assert "lr-finder server: stopped" in started.log_text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(started.url.rsplit(":", 1)[1])), timeout=2).close()
    (uploaded,) = (tmp_path / "artifacts").rglob("note.txt")
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "mlflow.db", tmp_path / "basic_auth.db")}
    modes |= {"artifacts": (tmp_path / "artifacts").stat().st_mode & 0o777, "note.txt": uploaded.stat().st_mode & 0o777}
    assert modes == {"mlflow.db": 0o600, "basic_auth.db": 0o600, "artifacts": 0o700, "note.txt": 0o600}
