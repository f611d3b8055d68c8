"""The team's MLflow tracking server: options -> the `mlflow server` command line (pure), then start it and wait."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mlproject.tracking_env import redact

log = logging.getLogger(__name__)

BACKENDS = ("sqlite", "postgresql", "postgresql+psycopg2", "postgresql+psycopg")
# SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; lr-finder[service] installs psycopg2, so name it.
DEFAULT_PG_DRIVER = "postgresql+psycopg2"
PG_MODULES = {
    "postgresql+psycopg2": ("psycopg2", "psycopg2-binary"),
    "postgresql+psycopg": ("psycopg", "psycopg[binary]"),
}
APP_NAMES = ("basic-auth",)
# Without both, MLflow's basic-auth app refuses to start (it ships no admin password and needs a CSRF key).
AUTH_SECRET_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
AUTH_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
AUTH_CONFIG_ENV = "MLFLOW_AUTH_CONFIG_PATH"
JOBS_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
POOL_SIZE_ENV, MAX_OVERFLOW_ENV = "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"
# The connections a server's workers may open together: PostgreSQL's default max_connections is 100.
PG_CONNECTIONS = 80
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServerConfigError(ValueError):
    """The options cannot make a working server; the message says what to change."""


class ServerStartError(RuntimeError):
    """The server process exited or never answered /health."""


@dataclass(frozen=True)
class ServerOptions:
    """What a team chooses; the defaults are a one-person server on this machine."""

    backend_store_uri: str = "sqlite:///mlflow.db"
    artifacts_destination: str = "./mlartifacts"
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 4
    app_name: str = ""
    auth_config: str = ""
    allowed_hosts: str = ""
    job_execution: bool = False


@dataclass(frozen=True)
class ServerPlan:
    """The exact process to start, the environment it adds, where it answers, and what to warn about."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    url: str
    health_url: str
    warnings: tuple[str, ...]


def plan(options: ServerOptions, environ: Mapping[str, str], mlflow_exe: str = "mlflow") -> ServerPlan:
    """Decide the `mlflow server` command line; raises ServerConfigError for a server that could not work."""
    scheme = urlsplit(options.backend_store_uri).scheme
    if scheme not in BACKENDS:
        raise ServerConfigError(
            f"backend store {redact(options.backend_store_uri)!r}: use sqlite:///FILE or postgresql://USER@HOST/DB"
        )
    # MLflow's job runner (GenAI judges, trace jobs) adds eight processes that lr-finder's runs never use;
    # on a small machine they slow the start and hold a stop for seconds.
    env = {JOBS_ENV: "true" if options.job_execution else "false"}
    argv = [mlflow_exe, "server", "--backend-store-uri", backend_uri(options)]
    # Proxied artifacts: clients upload through the server, so they need no access to the storage itself.
    argv += ["--serve-artifacts", "--artifacts-destination", options.artifacts_destination]
    argv += ["--host", options.host, "--port", str(options.port), "--workers", str(options.workers)]
    if options.allowed_hosts:
        argv += ["--allowed-hosts", options.allowed_hosts]
    if scheme != "sqlite":
        env.update(_pool_env(options.workers, environ))
    if options.app_name:
        env.update(_auth_env(options, environ))
        argv += ["--app-name", options.app_name]
    url_host = "127.0.0.1" if options.host in WILDCARD_HOSTS else options.host
    url = f"http://{_bracket(url_host)}:{options.port}"
    return ServerPlan(tuple(argv), env, url, f"{url}/health", tuple(_warnings(options, scheme)))


def backend_uri(options: ServerOptions) -> str:
    """The backend store URI with its database driver named."""
    uri = options.backend_store_uri
    return DEFAULT_PG_DRIVER + uri.removeprefix("postgresql") if urlsplit(uri).scheme == "postgresql" else uri


def needed_modules(options: ServerOptions) -> dict[str, str]:
    """Python modules the chosen server needs beyond mlflow itself -> the pip package that provides each."""
    needed = {}
    scheme = urlsplit(backend_uri(options)).scheme
    if scheme in PG_MODULES:
        module, package = PG_MODULES[scheme]
        needed[module] = package
    if options.app_name == "basic-auth":
        needed["flask_wtf"] = "Flask-WTF"  # MLflow's basic-auth app imports it for CSRF checks
    return needed


def _auth_env(options: ServerOptions, environ: Mapping[str, str]) -> dict[str, str]:
    if options.app_name not in APP_NAMES:
        raise ServerConfigError(f"app name {options.app_name!r}: the one supported is basic-auth")
    if not environ.get(AUTH_SECRET_ENV):
        raise ServerConfigError(f"basic-auth needs {AUTH_SECRET_ENV} (a random string, the same on every server)")
    if not options.auth_config and not environ.get(AUTH_PASSWORD_ENV):
        raise ServerConfigError(
            f"basic-auth needs the first admin's password: set {AUTH_PASSWORD_ENV} or admin_password in --auth-config"
        )
    return {AUTH_CONFIG_ENV: str(Path(options.auth_config).resolve())} if options.auth_config else {}


def _pool_env(workers: int, environ: Mapping[str, str]) -> dict[str, str]:
    """Each worker's database connections on PostgreSQL: 5 kept open, and overflow up to its share of PG_CONNECTIONS.

    SQLAlchemy's default, 5 + 10, is fewer than the requests a worker serves at once, and a request that waits 30 s
    for a connection fails (MLflow answers 400): under a burst of writers on a small machine, rows were lost that
    way. A variable the team set itself is kept."""
    wanted = {POOL_SIZE_ENV: "5", MAX_OVERFLOW_ENV: str(max(10, PG_CONNECTIONS // max(1, workers) - 5))}
    return {key: value for key, value in wanted.items() if not environ.get(key)}


def _warnings(options: ServerOptions, scheme: str) -> list[str]:
    found = []
    shared = options.host not in LOOPBACK_HOSTS
    if scheme == "sqlite" and shared:
        found.append(
            "sqlite for a server others reach: one file on this disk, one writer at a time;"
            " use PostgreSQL for a team (see README)"
        )
    if options.host in WILDCARD_HOSTS and not options.app_name:
        found.append(f"listening on {options.host or 'all interfaces'} without --app-name basic-auth: anyone can write")
    return found


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def display_argv(argv: Sequence[str]) -> str:
    return " ".join(redact(a) for a in argv)


def start(server: ServerPlan, environ: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start the server in its own session, so stop() reaches its uvicorn workers too; output goes to ours."""
    return subprocess.Popen(list(server.argv), env={**environ, **server.env}, start_new_session=True)


def wait_healthy(process: subprocess.Popen[bytes], health_url: str, timeout_s: float) -> float:
    """Poll /health until it answers OK; returns the seconds it took. MLflow takes ~20 s on a small machine."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if process.poll() is not None:
            raise ServerStartError(f"mlflow server exited with code {process.returncode} before answering")
        if _answers(health_url):
            return time.monotonic() - began
        time.sleep(0.5)
    raise ServerStartError(f"mlflow server did not answer {health_url} within {timeout_s:.0f} s")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop(process: subprocess.Popen[bytes], grace_s: float = 15.0) -> int:
    """SIGTERM the server's whole process group, SIGKILL whatever is left after grace_s; returns its exit code."""
    _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _group_alive(process) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(process):
        log.warning("mlflow server still running %.0f s after SIGTERM: killing it", grace_s)
        _signal_group(process, signal.SIGKILL)
    return process.wait(timeout=10)


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def _group_alive(process: subprocess.Popen[bytes]) -> bool:
    """Whether any process of the group still runs; zombies do not count (a container's init may reap late)."""
    process.poll()  # reap the leader
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if int(group) == process.pid and state != "Z":
            return True
    return False
