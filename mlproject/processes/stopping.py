"""SIGTERM, SIGINT and SIGHUP as a clean stop: the signal raises Preempted, except inside held(), which it waits for,
and inside together(), where every rank of a multi-process job stops at the same step.

A job launched by another process (`mlflow run`, this job's torchrun) also stops when that process dies: the kernel
sends SIGTERM (die_with_parent), so that no job trains on as an orphan.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable, Iterator

from mlproject.errors import Preempted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies
# How deep in held() the job is, the signal that arrived there or in together(), and whether a stop has begun.
_state: dict = {"depth": 0, "pending": "", "stopping": False, "together": False}


def install() -> None:
    """Stop on the first signal (docker stop, a preempted spot VM, a cancelled CI job, Ctrl-C, a closed terminal);
    ignore the rest, so that a second cannot interrupt the clean-up. The handler ignores them itself rather than
    switching to SIG_IGN: a Trainer puts back the handlers it found when its fit began, this one included."""
    _state.update(stopping=False, pending="")
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


def reclaim() -> None:
    """Put this module's handler back over the one a Trainer registered at its start: Lightning's own SIGTERM
    handler broadcasts from inside the signal, a collective the other ranks do not expect there."""
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not _handler:
            signal.signal(sig, _handler)


def _handler(signum: int, frame: object) -> None:
    if _state["stopping"]:
        return
    _state["stopping"] = True
    name = signal.Signals(signum).name
    if _state["depth"] or _state["together"]:
        _state["pending"] = name
        return
    raise Preempted(name)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A stop that arrives inside waits until the block is done, so that what it writes lands whole."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
    if not _state["depth"] and _state["pending"] and not _state["together"]:
        name, _state["pending"] = _state["pending"], ""
        raise Preempted(name)


@contextlib.contextmanager
def together(agree: Callable[[bool], bool]) -> Iterator[Callable[[], None]]:
    """Inside, a signal only marks the stop; the yielded check(), called by every rank at the same points (each
    step), raises Preempted on all of them once any has been signalled. `agree` is the ranks' vote (any)."""

    def check() -> None:
        if agree(bool(_state["pending"])):
            raise Preempted(_state["pending"] or "SIGTERM")  # a rank that got no signal stops with the others

    _state["together"] = True
    try:
        yield check
    finally:
        _state["together"] = False
    if _state["pending"]:  # it came after the last check: stop now, outside any collective
        raise Preempted(_state["pending"])


def die_with_parent() -> None:
    """SIGTERM when the launching process dies (Linux); stop at once if it already has."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
