"""Which commit the code comes from, for runs started outside `mlflow run` and for the image's label."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(folder: Path) -> str:
    """HEAD of the git checkout holding `folder`, or '' outside one (or without git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""
