"""The only docker import: build the image, start, stream, stop and probe the job container through the engine."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import docker
import requests
from docker.errors import DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.types import DeviceRequest
from docker.types import Mount as DockerMount
from docker.utils.build import exclude_paths

from mlproject.record.environment import QUIET
from service.probes import Probe, answer
from service.progress import TransferProgress, log_lines
from service.spec import LABEL, GpuRequest, LaunchSpec, name_conflict

log = logging.getLogger(__name__)
# A probe must answer quickly: MLflow's default retries take minutes against a server that is down.
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # stop the job container


class LaunchError(RuntimeError):
    """The engine refused or failed; the message says what to do."""


@dataclass(frozen=True)
class ImageInfo:
    id: str
    user: str
    revision: str


@dataclass(frozen=True)
class Outcome:
    """How the job container ended: its exit code (128+N when stopped by signal N) and its whole log."""

    code: int
    log: str
    stopped: bool


def connect() -> docker.DockerClient:
    """A client of the engine that DOCKER_HOST (or the default socket) names, checked with a ping."""
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except (DockerException, requests.RequestException) as exc:
        raise LaunchError(f"no Docker engine answers ({exc}); start dockerd or set DOCKER_HOST") from exc
    return client


def engine_version(client: docker.DockerClient) -> str:
    info = client.version()
    return f"Docker engine {info.get('Version', '?')} (API {info.get('ApiVersion', '?')})"


def context_size(context: Path) -> tuple[int, int]:
    """The files and bytes a build sends to the engine: the context less what .dockerignore leaves out."""
    ignore = context / ".dockerignore"
    patterns = [line.strip() for line in ignore.read_text().splitlines()] if ignore.is_file() else []
    kept = [context / name for name in exclude_paths(str(context), [p for p in patterns if p and p[0] != "#"])]
    files = [path for path in kept if path.is_file()]
    return len(files), sum(path.stat().st_size for path in files)


def build(
    client: docker.DockerClient, context: Path, tag: str, build_args: Mapping[str, str], network: str, no_cache: bool
) -> Iterator[str]:
    """Build the image, yielding the build log as it comes (a base image's pull as a line now and then: layers,
    megabytes); LaunchError on a failed step."""
    progress = TransferProgress()
    try:
        stream = client.api.build(
            path=str(context),
            tag=tag,
            buildargs=dict(build_args),
            network_mode=network or None,
            nocache=no_cache,
            rm=True,
            forcerm=True,
            decode=True,
        )
        for chunk in stream:
            if "error" in chunk:
                raise LaunchError(f"build failed: {chunk['error'].strip()}")
            text = chunk.get("stream") or (progress.line(chunk, time.monotonic()) if "status" in chunk else None)
            if text:
                yield text if text.endswith("\n") else text + "\n"
    except (DockerException, requests.RequestException) as exc:
        raise LaunchError(f"build failed: {exc}") from exc


def image_info(client: docker.DockerClient, ref: str) -> ImageInfo:
    try:
        image = client.images.get(ref)
    except ImageNotFound as exc:
        raise LaunchError(f"no image {ref} on this engine; build it with `lr-finder build --tag {ref}`") from exc
    config = image.attrs.get("Config") or {}
    labels = config.get("Labels") or {}
    return ImageInfo(image.id, config.get("User") or "root", labels.get("org.opencontainers.image.revision", ""))


def ensure_image(client: docker.DockerClient, ref: str, on_line: Callable[[str], None]) -> ImageInfo:
    """The image's facts, pulled first (its progress passed to on_line) when this engine does not have it."""
    with contextlib.suppress(LaunchError):
        return image_info(client, ref)
    on_line(f"lr-finder: pulling {ref} (not on this engine)\n")
    progress = TransferProgress()
    try:
        for event in client.api.pull(ref, stream=True, decode=True):
            if "error" in event:
                raise DockerException(event["error"])
            line = progress.line(event, time.monotonic())
            if line:
                on_line(line + "\n")
    except (DockerException, requests.RequestException) as exc:
        reason = (getattr(exc, "explanation", None) or str(exc)).strip().splitlines()[0][:300]
        hint = f"build it (lr-finder build --tag {ref}), or docker login to its registry"
        raise LaunchError(f"no image {ref} here, and pulling it failed ({reason}); {hint}") from exc
    return image_info(client, ref)


def clear_name(client: docker.DockerClient, name: str) -> bool:
    """Make `name` free for the job container: True when an exited leftover of this service was removed;
    LaunchError when a running container, or one this service did not start, holds it."""
    try:
        held = client.containers.get(name)
    except NotFound:
        return False
    except (DockerException, requests.RequestException) as exc:
        raise LaunchError(f"cannot look up container {name}: {exc}") from exc
    problem = name_conflict(name, held.status, LABEL in held.labels)
    if problem:
        raise LaunchError(problem)
    _remove(held)
    return True


def _device_requests(gpus: GpuRequest) -> list[DeviceRequest]:
    if not gpus.wanted:
        return []
    if gpus.device_ids:
        return [DeviceRequest(device_ids=list(gpus.device_ids), capabilities=[["gpu"]])]
    return [DeviceRequest(count=gpus.count, capabilities=[["gpu"]])]


def _create(
    client: docker.DockerClient,
    spec: LaunchSpec,
    environment: Mapping[str, str],
    command: list[str],
    entrypoint: list[str] | None = None,
    gpus: bool = True,
) -> Container:
    mounts = [
        DockerMount(m.target, m.source, type="bind" if m.is_bind else "volume", read_only=m.read_only)
        for m in spec.mounts
    ]
    try:
        return client.containers.create(
            spec.image,
            command=command,
            entrypoint=entrypoint,
            environment={**environment, **QUIET},
            device_requests=_device_requests(spec.gpus) if gpus else [],
            shm_size=spec.shm_size,
            nano_cpus=int(spec.cpus * 1e9) or None,
            mounts=mounts,
            network_mode=spec.network or None,
            name=spec.name or None,
            labels={LABEL: "1"},
        )
    except ImageNotFound as exc:
        raise LaunchError(f"no image {spec.image}; build it with `lr-finder build --tag {spec.image}`") from exc
    except (DockerException, requests.RequestException) as exc:
        raise LaunchError(f"cannot create the container: {exc}") from exc


def supervise(
    client: docker.DockerClient,
    spec: LaunchSpec,
    environment: Mapping[str, str],
    stop_timeout: int,
    on_line: Callable[[str], None],
) -> Outcome:
    """Start the job container and pass on its log until it exits; Ctrl-C or SIGTERM stops it. Always removed.

    The signal handlers only note the signal; the main thread waits on the log's thread and acts on the note. An
    exception raised from a handler (KeyboardInterrupt) lands wherever the main thread happens to be, and inside a
    finaliser Python prints and drops it: the container would run on.
    """
    signals: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        signals.append(signum)  # the first one counts; later ones must not interrupt the clean-up

    previous = {sig: signal.signal(sig, note) for sig in STOP_SIGNALS}
    container = None
    try:
        if spec.name and clear_name(client, spec.name):
            on_line(f"lr-finder: removed the exited container {spec.name} that an earlier run left\n")
        container = _create(client, spec, environment, list(spec.args), list(spec.entrypoint) or None)
        if not signals:
            container.start()
        log_thread = _LogThread(container, on_line)
        log_thread.start()
        while log_thread.is_alive() and not signals:
            log_thread.join(timeout=0.2)
        if signals:
            on_line("lr-finder: stopping the job container\n")
            try:  # the image's stop signal (SIGINT: mlflow run cancels the job), SIGKILL after stop_timeout seconds
                container.stop(timeout=stop_timeout)
            except (DockerException, requests.RequestException) as stop_exc:
                log.warning("stopping container %s failed: %s", container.short_id, stop_exc)
            log_thread.join(timeout=5)  # the job's last lines, as it winds down
            return Outcome(128 + signals[0], _logs(container), stopped=True)
        if log_thread.failure is not None:
            raise log_thread.failure
        return Outcome(int(container.wait()["StatusCode"]), _logs(container), stopped=False)
    except (DockerException, requests.RequestException) as exc:
        raise LaunchError(f"the job container failed to run: {exc}") from exc
    finally:
        if container is not None:
            _remove(container)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _LogThread(threading.Thread):
    """Passes the container's log on, line by line, until the container exits; keeps what stopped it early."""

    def __init__(self, container: Container, on_line: Callable[[str], None]) -> None:
        super().__init__(name="job-log", daemon=True)
        self.container, self.on_line = container, on_line
        self.failure: DockerException | requests.RequestException | None = None

    def run(self) -> None:
        try:
            for line in log_lines(self.container.logs(stream=True, follow=True)):
                self.on_line(line)
        except (DockerException, requests.RequestException) as exc:
            self.failure = exc


def _logs(container: Container) -> str:
    return container.logs().decode("utf-8", errors="replace")


def _remove(container: Container) -> None:
    try:
        container.remove(force=True, v=True)  # v: the anonymous /data volume when no dataset was mounted
    except (DockerException, requests.RequestException) as exc:
        log.warning("removing container %s failed: %s", container.short_id, exc)


def probe(
    client: docker.DockerClient, spec: LaunchSpec, environment: Mapping[str, str], check: Probe
) -> tuple[bool, str]:
    """Run one check in a throwaway container of the job image: (passed, its one-line answer)."""
    try:
        container = _create(
            client, spec, {**environment, **PROBE_ENV}, list(check.command), entrypoint=["python"], gpus=check.gpus
        )
    except LaunchError as exc:
        return False, str(exc)
    try:
        container.start()
        status = int(container.wait()["StatusCode"])
        output = _logs(container)
    except (DockerException, requests.RequestException) as exc:
        return False, f"the engine refused: {getattr(exc, 'explanation', None) or exc}"
    finally:
        _remove(container)
    return status == 0, answer(output, status)
