"""SIGTERM and SIGINT as a clean stop: the signal raises Preempted, except inside held(), which it waits for."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from mlproject.errors import Preempted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# How deep in held() the job is, the signal that arrived there, and whether a stop has begun.
_state: dict = {"depth": 0, "pending": "", "stopping": False}


def install() -> None:
    """Stop on the first SIGTERM (docker stop, a preempted spot VM, a cancelled CI job) or SIGINT; ignore the rest,
    so that a second signal cannot interrupt the clean-up. The handler ignores them itself rather than switching
    to SIG_IGN: a Trainer puts back the handlers it found when its fit began, this one included."""
    _state["stopping"] = False

    def handler(signum: int, frame: object) -> None:
        if _state["stopping"]:
            return
        _state["stopping"] = True
        name = signal.Signals(signum).name
        if _state["depth"]:
            _state["pending"] = name
            return
        raise Preempted(name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A stop that arrives inside waits until the block is done, so that what it writes lands whole."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
    if not _state["depth"] and _state["pending"]:
        name, _state["pending"] = _state["pending"], ""
        raise Preempted(name)
