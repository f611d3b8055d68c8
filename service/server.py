"""The team's MLflow tracking server: options -> the `mlflow server` process to start (pure), then start it, wait
until it answers, and stop it with everything it started."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger(__name__)

BACKENDS = ("sqlite", "postgresql", "postgresql+psycopg2", "postgresql+psycopg")
# SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; lr-finder[server] installs psycopg2, so name it.
DEFAULT_PG_DRIVER = "postgresql+psycopg2"
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
# The sqlite store, basic-auth's users and the uploaded artifacts are the server's alone: under the usual umask
# (022) MLflow creates them readable by every local user.
PRIVATE_UMASK = 0o077
DEFAULT_AUTH_DB = "basic_auth.db"  # MLflow's basic_auth.ini keeps users there, in the server's working directory
WILDCARD_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}
HOST_HELP = "use an IP address (IPv6 with or without brackets: ::1, [::]) or a host name"
HERE = "use one of this machine's addresses, or 0.0.0.0 / :: for all of them"
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_NUMERIC = re.compile(r"[0-9.]+")  # looks like an IPv4 address but is none (1.2.3, 300.1.1.1)
LISTEN = "0A"  # a socket's state in /proc/net/tcp


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


def with_driver(uri: str) -> str:
    """A database URI with the driver lr-finder[server] installs named, where it names none."""
    return DEFAULT_PG_DRIVER + uri.removeprefix("postgresql") if urlsplit(uri).scheme == "postgresql" else uri


def where(uri: str) -> str:
    """A URI as shown to people: no user information and no query (libpq takes ?password=), so nothing secret."""
    scheme, sep, rest = uri.partition("://")
    return (scheme + sep + _split_userinfo(rest)[1]).split("?", 1)[0] if sep else uri.split("?", 1)[0]


def has_password(uri: str) -> bool:
    """Whether the URI carries a password, in its user information or in its query."""
    userinfo = _split_userinfo(uri.partition("://")[2])[0]
    return ":" in userinfo or any(key == "password" for key, _ in parse_qsl(urlsplit(uri).query))


def _split_userinfo(rest: str) -> tuple[str, str]:
    """What follows scheme:// -> (user information, the rest). It ends at the last @, since a raw password may hold
    / or @; sqlite:////abs/path has no authority, and its path may hold an @."""
    if rest.startswith("/") or "@" not in rest:
        return "", rest
    userinfo, _, tail = rest.rpartition("@")
    return userinfo, tail


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


def exit_reason(code: int) -> str:
    """How a process ended, as people read it: 'exit code 1', or 'killed by SIGKILL'."""
    if code >= 0:
        return f"exit code {code}"
    with contextlib.suppress(ValueError):
        return f"killed by {signal.Signals(-code).name}"
    return f"killed by signal {-code}"


def listening_inodes(table: str, port: int) -> set[int]:
    """The inodes of the sockets that listen on `port`, from the text of /proc/net/tcp or /proc/net/tcp6."""
    found = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
            found.add(int(fields[9]))
    return found


# --- the process: the only part with side effects ---------------------------------------------------------------


def check_port(host: str, port: int) -> None:
    """Refuse a port another process holds, or an address this machine lacks, before anything starts."""
    problem = port_problem(host, port)
    if problem is not None:
        raise problem


def port_problem(host: str, port: int) -> ServerConfigError | ServerStartError | None:
    """Why uvicorn could not bind host:port now (found by binding it as uvicorn will, then letting go), or None."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            return ServerConfigError("--host", f"{host!r}: no such host ({exc.strerror}); {HERE}")
        except OSError as exc:
            return _bind_error(host, port, exc)
    return None


def _bind_error(host: str, port: int, exc: OSError) -> Exception:
    if exc.errno == errno.EADDRINUSE:
        return ServerStartError(f"port {port} on {host} is in use by another process: stop it or choose another --port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ServerConfigError("--host", f"{host} is no address of this machine; {HERE}")
    if exc.errno == errno.EACCES:
        return ServerConfigError("--port", f"{port}: ports below 1024 need root; use one above, e.g. 5000")
    return ServerStartError(f"cannot listen on {host} port {port}: {exc.strerror}")


def start(server: ServerPlan, environ: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start the server in its own session, so stop() reaches its uvicorn workers too; output goes to ours."""
    env = {**environ, **server.env}
    return subprocess.Popen(list(server.argv), env=env, start_new_session=True, umask=PRIVATE_UMASK)


def wait_healthy(process: subprocess.Popen[bytes], server: ServerPlan, timeout_s: float) -> float:
    """Poll /health until the server this process started answers it; returns the seconds it took. MLflow takes
    ~20 s on a small machine, long enough for another process to take the port meanwhile."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if process.poll() is not None:
            taken = port_problem(server.host, server.port)  # another process bound it first: say so
            reason = f": {taken}" if isinstance(taken, ServerStartError) else ""
            raise ServerStartError(f"mlflow server ended ({exit_reason(process.returncode)}) before answering{reason}")
        if _answers(server.health_url):
            if listens(process.pid, server.port) is False:
                raise ServerStartError(
                    f"port {server.port} answers /health, but not from the server this command started:"
                    " another process holds it; stop it or choose another --port"
                )
            return time.monotonic() - began
        time.sleep(0.5)
    raise ServerStartError(f"mlflow server did not answer {server.health_url} within {timeout_s:.0f} s")


def _answers(url: str) -> bool:
    # No proxy: an http_proxy meant for the internet must not answer for a server on this machine.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def listens(pgid: int, port: int) -> bool | None:
    """Whether a process of the group listens on port; None where /proc cannot tell (not Linux)."""
    tables = [path.read_text() for path in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")) if path.exists()]
    if not tables:
        return None
    sockets = {f"socket:[{inode}]" for table in tables for inode in listening_inodes(table, port)}
    return bool(sockets) and any(_holds(pid, sockets) for pid, _ in _group(pgid))


def _holds(pid: int, sockets: set[str]) -> bool:
    with contextlib.suppress(OSError):  # the process ended while we looked
        return any(os.readlink(fd) in sockets for fd in Path(f"/proc/{pid}/fd").iterdir())
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
    if not Path("/proc").is_dir():
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return False
        return True
    return any(state != "Z" for _, state in _group(process.pid))


def _group(pgid: int) -> Iterator[tuple[int, str]]:
    """(pid, state) of each process in the group, from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if int(group) == pgid:
            yield int(stat.parent.name), state
