"""A study's fan-out in CI (`lr-finder deploy study`): study.json from the plan stage -> GitHub's job outputs for a
matrix, or a GitLab child pipeline with one job per member."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.deploy_target import DeployError


@dataclass(frozen=True)
class Study:
    """study.json as the plan stage writes it: the parent run and one label per member."""

    parent_run: str
    members: tuple[str, ...]


def read_study(text: str) -> Study:
    """study.json, checked: a parent run id and at least one member label."""
    try:
        data = json.loads(text)
        study = Study(str(data["parent_run"]), tuple(str(m) for m in data["members"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise DeployError("--study", f"not a study.json ({{'parent_run': ID, 'members': [...]}}): {exc}") from None
    if not re.fullmatch(r"[0-9a-zA-Z_-]{1,64}", study.parent_run) or not study.members:
        raise DeployError("--study", "needs a parent_run id and at least one member")
    return study


def github_outputs(study: Study) -> str:
    """Lines for $GITHUB_OUTPUT: the parent run, and the members as a JSON list for a matrix."""
    return f"parent_run={study.parent_run}\nmembers={json.dumps(list(study.members))}\n"


def gitlab_child(pipeline: Mapping[str, Any], study: Study) -> dict[str, Any]:
    """A child pipeline for the members: the parent's hidden jobs, the parent run, one matrix job per member."""
    hidden = {key: copy.deepcopy(value) for key, value in pipeline.items() if key.startswith(".")}
    if ".study-member" not in hidden:
        raise DeployError("--pipeline", "no hidden job .study-member to run the members with")
    member = {"extends": ".study-member", "parallel": {"matrix": [{"MEMBER": list(study.members)}]}}
    return {"variables": {"PARENT_RUN": study.parent_run}, **hidden, "study-member": member}
