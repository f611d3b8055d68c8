"""The `mlflow server` process: refuse a port that is taken, start it in its own session, wait until it answers
/health (from this process, not another on the port), and stop it with everything it started."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from service.server import HERE, ServerConfigError, ServerPlan, ServerStartError

log = logging.getLogger(__name__)

# The sqlite store, basic-auth's users and the uploaded artifacts are the server's alone: under the usual umask
# (022) MLflow creates them readable by every local user.
PRIVATE_UMASK = 0o077
LISTEN = "0A"  # a socket's state in /proc/net/tcp


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


def _bind_error(host: str, port: int, exc: OSError) -> ServerConfigError | ServerStartError:
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
