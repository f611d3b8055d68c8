"""How the engine's streams become lines for people: a pull's layer events, and a container's log bytes."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)")


class TransferProgress:
    """A pull's events (`lr-finder run` pulling the image, a build's FROM) -> a line at each finished layer and
    every few seconds between: layers done, megabytes downloaded. Docker sends one event per 512 kB per layer."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self._layers: set[str] = set()
        self._done: set[str] = set()
        self._bytes: dict[str, tuple[int, int]] = {}  # layer -> (downloaded, size)
        self._shown = float("-inf")

    def line(self, event: Mapping[str, Any], now: float) -> str | None:
        """The line this event is worth, if any; events of no layer (Digest:, Status:) are shown as they are."""
        status, layer = str(event.get("status") or ""), str(event.get("id") or "")
        if not layer or status.startswith("Pulling from"):
            return status or None
        self._layers.add(layer)
        detail = event.get("progressDetail") or {}
        if status == "Downloading" and detail.get("total"):
            self._bytes[layer] = (int(detail.get("current") or 0), int(detail["total"]))
        elif status == "Download complete" and layer in self._bytes:
            self._bytes[layer] = (self._bytes[layer][1], self._bytes[layer][1])
        if status in ("Pull complete", "Already exists"):
            self._done.add(layer)
        elif now - self._shown < self.every_s:
            return None
        self._shown = now
        got, size = (sum(pair[i] for pair in self._bytes.values()) / 1e6 for i in (0, 1))
        return f"layers {len(self._done)}/{len(self._layers)} done, {got:.1f} of {size:.1f} MB downloaded"


def log_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """A log's bytes as they come -> its lines, each cut after a newline or a carriage return (progress bars), a
    character split between chunks kept whole."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    for chunk in chunks:
        pending += decoder.decode(chunk)
        end = 0
        for match in _LINE.finditer(pending):
            yield match.group(0)
            end = match.end()
        pending = pending[end:]
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending
