"""`lr-finder server` tried the ways it could break: a password on a command line, files other users can read, a
port another process holds, an IPv6 host, and the server dying under it. Real processes, ports and files."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import (
    BIN,
    free_port,
    http_answering,
    http_status,
    lr_finder,
    lr_finder_server,
    postgres_database,
    wait_for_line,
)


def server_env() -> dict[str, str]:
    """This environment without the variables that choose a server's store or a client's target."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


def cmdlines() -> dict[int, str]:
    """Every process's command line on this machine, as `ps` shows it to any user."""
    found = {}
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found[int(path.parent.name)] = path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended while we looked
    return found


def group_of_child(parent: int) -> set[int]:
    """The processes of the group led by `parent`'s child (the `mlflow server` that lr-finder started)."""
    stats = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            _, ppid, pgid = path.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        stats[int(path.parent.name)] = (int(ppid), int(pgid))
    leaders = [pid for pid, (ppid, _) in stats.items() if ppid == parent]
    return {pid for pid, (_, pgid) in stats.items() if pgid in leaders}


def port_closed(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except OSError:
        return True
    return False


def test_a_port_another_process_holds_fails_at_once_naming_it(tmp_path):
    """The other process even answers /health as MLflow does: lr-finder must not take it for its own server."""
    with http_answering(200, b"OK") as url:
        port = url.rsplit(":", 1)[1]
        began = time.monotonic()
        result = subprocess.run(
            [str(BIN / "lr-finder"), "server", "--port", port, "--backend-store-uri", f"sqlite:///{tmp_path}/m.db"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=server_env(),
            timeout=60,
        )
        seconds = time.monotonic() - began
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: port {port} on 127.0.0.1 is in use by another process: stop it or choose another --port"
    )
    assert "ready" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert seconds < 15, "refused before starting anything"
    assert not (tmp_path / "m.db").exists()


@pytest.mark.slow
def test_a_port_taken_while_the_server_starts_is_not_mistaken_for_it(tmp_path):
    """The port was free when lr-finder looked; another process binds it before MLflow's workers do."""
    port, log = free_port(), tmp_path / "server.log"
    cmd = [str(BIN / "lr-finder"), "server", "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path}/m.db"]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=server_env())
    try:
        wait_for_line(process, log, "starting:", 60)
        with http_answering(200, b"OK", port=port):  # the impostor answers /health from now on
            code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    lines = log.read_text().splitlines()
    assert code == 1
    assert not any("ready at" in line for line in lines)
    (error,) = [line for line in lines if line.startswith("Error:")]
    assert f"port {port}" in error and "another process" in error
    assert not group_of_child(process.pid), "nothing of the server is left running"


@pytest.mark.slow
def test_a_password_in_the_backend_uri_reaches_no_command_line_and_no_output(tmp_path):
    """PostgreSQL asks for the password (scram-sha-256): the server answering proves it got it, by its environment."""
    password = "pw-" + secrets.token_urlsafe(12)
    with postgres_database(password) as uri:
        secret = tmp_path / "backend-uri"
        secret.write_text(uri + "\n")
        secret.chmod(0o600)
        args = ["--backend-store-uri-file", str(secret), "--artifacts-destination", str(tmp_path / "artifacts")]
        with lr_finder_server(tmp_path / "srv", *args, env=server_env()) as srv:
            group = group_of_child(srv.process.pid)
            shown = cmdlines()
            client = MlflowClient(srv.url)
            run = client.create_run(client.create_experiment("secrets"))
            (tmp_path / "note.txt").write_text("hello")
            client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        log = srv.log_text()
    assert len(group) >= 2, "the mlflow server and its uvicorn processes"
    assert srv.process.pid in shown and group <= shown.keys()
    assert not [pid for pid, line in shown.items() if password in line], "a command line holds the password"
    assert password not in log
    assert "backend store postgresql+psycopg2://127.0.0.1:" in log
    assert not any("holds a password" in line or "readable by other users" in line for line in log.splitlines())
    artifacts = tmp_path / "artifacts"
    (uploaded,) = [p for p in artifacts.rglob("note.txt")]
    assert artifacts.stat().st_mode & 0o777 == 0o700 and uploaded.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_an_ipv6_host_in_brackets_listens_there_without_a_no_auth_warning(tmp_path):
    args = ["--host", "[::1]", "--backend-store-uri", f"sqlite:///{tmp_path}/m.db", "--workers", "1"]
    with lr_finder_server(tmp_path, *args, env=server_env()) as srv:
        assert srv.url.startswith("http://[::1]:")
        assert http_status(srv.url + "/health") == 200
        assert MlflowClient(srv.url).get_experiment_by_name("Default") is not None  # MLflow accepts the Host header
    assert srv.process.returncode == 0
    assert "warning:" not in srv.log_text()
    assert f"export MLFLOW_TRACKING_URI={srv.url}" in srv.log_text()


@pytest.mark.slow
def test_a_server_that_dies_later_is_reported_with_its_exit_code_and_leaves_nothing_running(tmp_path):
    args = ["--backend-store-uri", f"sqlite:///{tmp_path}/m.db", "--workers", "2"]
    with lr_finder_server(tmp_path, *args, env=server_env()) as srv:
        group = group_of_child(srv.process.pid)
        shown = cmdlines()
        (uvicorn,) = [pid for pid in group if " -m uvicorn " in shown.get(pid, "") and "--workers" in shown[pid]]
        os.kill(uvicorn, signal.SIGKILL)  # as the kernel's OOM killer would
        code = srv.process.wait(timeout=120)
        lines = srv.log_text().splitlines()
    assert code == 1
    assert lines[-1].startswith("Error: mlflow server stopped on its own (exit code ")
    assert "Traceback" not in srv.log_text()
    assert not group_of_child(srv.process.pid) and port_closed(srv.url)


def test_a_typed_password_warns_and_a_missing_uri_file_is_refused_as_processes(tmp_path):
    """The same as the command line tests, as a user's shell runs it: one line each, no traceback."""
    with http_answering(200, b"OK") as url:
        port = url.rsplit(":", 1)[1]
        typed = lr_finder(
            "server", "--port", port, "--backend-store-uri", "postgresql://u:s3cret@h/db", env=server_env()
        )
    assert typed.returncode == 1
    assert "warning: --backend-store-uri holds a password" in typed.stderr and "s3cret" not in typed.stderr
    missing = lr_finder("server", "--backend-store-uri-file", str(tmp_path / "none"), env=server_env())
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.splitlines()[-1].startswith("Error: Invalid value for '--backend-store-uri-file'")
