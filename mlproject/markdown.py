"""Markdown tables for job summaries and study comparisons, with cells that cannot break them."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

_ACTIVE = re.compile(r"([\\`*_\[\]|])")  # emphasis, code, links; a pipe would split the cell


def cell(text: object) -> str:
    """Text as one inert table cell: HTML escaped, markdown's active characters escaped, newlines joined."""
    escaped = _ACTIVE.sub(r"\\\1", html.escape(str(text), quote=False))
    return escaped.replace("\r", " ").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Cells are taken as given (escape untrusted text with cell() first); ends with a newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
