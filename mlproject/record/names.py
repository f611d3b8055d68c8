"""The names a run's metrics and params are stored under. A user's module may log a value under any name
(`self.log("val error (%)", ...)`); MLflow keeps only letters, digits, `_ - . : /` and spaces, at most 250
characters, never a path that leaves itself (`a/../b`), and refuses the whole batch a bad name is in. Each
character it refuses becomes `_`, and the run records every name it changed (tag `renamed`), so that the value is
kept and can be found. The tracker applies it to every metric and param key it writes."""

from __future__ import annotations

import json
import logging
import posixpath
import re

log = logging.getLogger(__name__)

TAG = "renamed"  # {the name logged: the name stored}, for every name the run changed
MAX_KEY = 250  # MLflow's limit on a metric name or a param key
REFUSED = re.compile(r"[^/\w.\- :]")  # MLflow's rule, inverted: \w is any letter or digit, as in MLflow's


def storable(name: str) -> str:
    """`name` as MLflow stores it: itself where MLflow takes it; otherwise each refused character as `_`, a path
    that would leave itself with its slashes as `_`, and cut to MAX_KEY characters."""
    stored = REFUSED.sub("_", name)[:MAX_KEY] or "_"
    if _leaves_itself(stored):
        stored = stored.replace("/", "_")
        if _leaves_itself(stored):  # "." or ".." and the like
            stored = ("_" + stored)[:MAX_KEY]
    return stored


def _leaves_itself(name: str) -> bool:
    """MLflow's test: a name must be its own normal path, and neither "." nor above or at the root."""
    norm = posixpath.normpath(name)
    return norm != name or norm == "." or norm.startswith(("..", "/"))


class Renames:
    """The names one run changed, each said once (a warning naming it) and recorded in the tag TAG."""

    def __init__(self) -> None:
        self.done: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        stored = storable(name)
        if stored != name and name not in self.done:
            self.done[name] = stored
            log.warning(
                "%r is logged as %r: MLflow's names hold only letters, digits, spaces and _ - . : /", name, stored
            )
        return stored

    def tag(self) -> dict[str, str]:
        """The tag that records the names changed so far ({} while none was)."""
        return {TAG: json.dumps(self.done, sort_keys=True, ensure_ascii=False)} if self.done else {}
