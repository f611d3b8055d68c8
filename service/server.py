"""The team's MLflow tracking server, decided without starting it: options -> the `mlflow server` process to start,
its environment, where it answers, and what to warn about. server_process starts, watches and stops it."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from service.uris import where, with_driver

BACKENDS = ("sqlite", "postgresql", "postgresql+psycopg2", "postgresql+psycopg")
PG_MODULES = {
    "postgresql+psycopg2": ("psycopg2", "psycopg2-binary"),
    "postgresql+psycopg": ("psycopg", "psycopg[binary]"),
}
# What `mlflow server` imports that mlflow-skinny (the host install) lacks: the full mlflow brings them all.
SERVER_MODULES = {module: "mlflow" for module in ("flask", "flask_cors", "sqlalchemy", "alembic", "graphene")}
SERVER_EXTRA = "lr-finder[server]"
APP_NAMES = ("basic-auth",)
# Without both, MLflow's basic-auth app refuses to start (it ships no admin password and needs a CSRF key).
AUTH_SECRET_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
AUTH_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
AUTH_CONFIG_ENV = "MLFLOW_AUTH_CONFIG_PATH"
# `mlflow server` reads both URIs from its environment, which only its own user can read; any user sees argv in ps.
BACKEND_URI_ENV, ARTIFACTS_ENV = "MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"
JOBS_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
POOL_SIZE_ENV, MAX_OVERFLOW_ENV = "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"
# The connections a server's workers may open together: PostgreSQL's default max_connections is 100.
PG_CONNECTIONS = 80
DEFAULT_AUTH_DB = "basic_auth.db"  # MLflow's basic_auth.ini keeps users there, in the server's working directory
WILDCARD_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}
HOST_HELP = "use an IP address (IPv6 with or without brackets: ::1, [::]) or a host name"
HERE = "use one of this machine's addresses, or 0.0.0.0 / :: for all of them"
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_NUMERIC = re.compile(r"[0-9.]+")  # looks like an IPv4 address but is none (1.2.3, 300.1.1.1)


class ServerConfigError(ValueError):
    """The options cannot make a working server; the message says what to change in `option`."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


class ServerStartError(RuntimeError):
    """The server process exited, never answered /health, or its port is another process's."""


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
    """The exact process to start, the environment it adds (secrets: never shown), where it listens and answers,
    and what to warn about."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)
    host: str
    port: int
    url: str
    health_url: str
    warnings: tuple[str, ...]
    shown: str


def plan(options: ServerOptions, environ: Mapping[str, str], mlflow_exe: str = "mlflow") -> ServerPlan:
    """Decide the `mlflow server` process; raises ServerConfigError for a server that could not work."""
    scheme = urlsplit(options.backend_store_uri).scheme
    if scheme not in BACKENDS:
        raise ServerConfigError(
            "--backend-store-uri",
            f"{where(options.backend_store_uri)!r}: use sqlite:///FILE or postgresql://USER@HOST/DB",
        )
    host = listen_host(options.host)
    # MLflow's job runner (GenAI judges, trace jobs) adds eight processes that lr-finder's runs never use;
    # on a small machine they slow the start and hold a stop for seconds.
    env = {JOBS_ENV: "true" if options.job_execution else "false"}
    # Proxied artifacts: clients upload through the server, so they need no access to the storage itself.
    env.update({BACKEND_URI_ENV: with_driver(options.backend_store_uri), ARTIFACTS_ENV: options.artifacts_destination})
    argv = [mlflow_exe, "server", "--serve-artifacts"]
    argv += ["--host", host, "--port", str(options.port), "--workers", str(options.workers)]
    if options.allowed_hosts:
        argv += ["--allowed-hosts", options.allowed_hosts]
    if scheme != "sqlite":
        env.update(_pool_env(options.workers, environ))
    if options.app_name:
        env.update(_auth_env(options, environ))
        argv += ["--app-name", options.app_name]
    url = f"http://{_bracket(WILDCARD_TO_LOOPBACK.get(host, host))}:{options.port}"
    shown = f"{' '.join(argv)} (backend store {where(env[BACKEND_URI_ENV])}, artifacts {where(env[ARTIFACTS_ENV])})"
    warnings = tuple(_warnings(options, host, scheme))
    return ServerPlan(tuple(argv), env, host, options.port, url, f"{url}/health", warnings, shown)


def listen_host(text: str) -> str:
    """The --host as uvicorn binds it: an IP address in its plain form (IPv6 without brackets) or a host name."""
    bracketed = text.startswith("[") and text.endswith("]")
    bare = text[1:-1] if bracketed else text
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        if not bracketed and _HOSTNAME.fullmatch(text) and not _NUMERIC.fullmatch(text):
            return text
        raise ServerConfigError("--host", f"{text!r} is not an address to listen on: {HOST_HELP}") from None
    if bracketed and address.version == 4:
        raise ServerConfigError("--host", f"{text!r}: brackets are for IPv6 addresses only; {HOST_HELP}")
    return str(address)


def is_loopback(host: str) -> bool:
    """Whether only this machine reaches host (a name other than localhost may resolve to anything)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def uri_from_file(text: str, path: str) -> str:
    """The URI a secret file holds: its first line that is not blank (a mounted Secret may end with a newline)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    raise ServerConfigError("--backend-store-uri-file", f"{path} is empty: write the URI on its first line")


def private_paths(options: ServerOptions) -> list[Path]:
    """The files and folders on this disk the server keeps its data in (relative ones: in its working directory)."""
    paths = []
    uri = options.backend_store_uri
    if uri.startswith("sqlite:///"):
        paths.append(Path(uri.removeprefix("sqlite:///").split("?", 1)[0]))
    artifacts = urlsplit(options.artifacts_destination)
    if artifacts.scheme in ("", "file"):
        paths.append(Path(artifacts.path))
    if options.app_name == "basic-auth" and not options.auth_config:
        paths.append(Path(DEFAULT_AUTH_DB))
    return paths


def exposed(mode: int) -> bool:
    """Whether a file of this mode is open to other users than its owner."""
    return bool(mode & 0o077)


def needed_modules(options: ServerOptions) -> dict[str, str]:
    """Python modules the chosen server needs -> the pip package that provides each (all in lr-finder[server])."""
    needed = dict(SERVER_MODULES)
    if options.job_execution:
        needed["huey"] = "mlflow"  # MLflow's job runner's queue
    scheme = urlsplit(with_driver(options.backend_store_uri)).scheme
    if scheme in PG_MODULES:
        module, package = PG_MODULES[scheme]
        needed[module] = package
    if options.app_name == "basic-auth":
        needed["flask_wtf"] = "Flask-WTF"  # MLflow's basic-auth app imports it for CSRF checks
    return needed


def _auth_env(options: ServerOptions, environ: Mapping[str, str]) -> dict[str, str]:
    if options.app_name not in APP_NAMES:
        raise ServerConfigError("--app-name", f"{options.app_name!r}: the one supported is basic-auth")
    if not environ.get(AUTH_SECRET_ENV):
        raise ServerConfigError(
            "--app-name", f"basic-auth needs {AUTH_SECRET_ENV} (a random string, the same on every server)"
        )
    if not options.auth_config and not environ.get(AUTH_PASSWORD_ENV):
        raise ServerConfigError(
            "--app-name",
            f"basic-auth needs the first admin's password: set {AUTH_PASSWORD_ENV} or admin_password in --auth-config",
        )
    return {AUTH_CONFIG_ENV: str(Path(options.auth_config).resolve())} if options.auth_config else {}


def _pool_env(workers: int, environ: Mapping[str, str]) -> dict[str, str]:
    """Each worker's database connections on PostgreSQL: 5 kept open, and overflow up to its share of PG_CONNECTIONS.

    SQLAlchemy's default, 5 + 10, is fewer than the requests a worker serves at once, and a request that waits 30 s
    for a connection fails (MLflow answers 400): under a burst of writers on a small machine, rows were lost that
    way. A variable the team set itself is kept."""
    wanted = {POOL_SIZE_ENV: "5", MAX_OVERFLOW_ENV: str(max(10, PG_CONNECTIONS // max(1, workers) - 5))}
    return {key: value for key, value in wanted.items() if not environ.get(key)}


def _warnings(options: ServerOptions, host: str, scheme: str) -> list[str]:
    found = []
    shared = not is_loopback(host)
    if scheme == "sqlite" and shared:
        found.append(
            "sqlite for a server others reach: one file on this disk, one writer at a time;"
            " use PostgreSQL for a team (see README)"
        )
    if shared and not options.app_name:
        found.append(f"listening on {host}, beyond this machine, without --app-name basic-auth: anyone can write")
    return found


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
