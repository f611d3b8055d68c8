"""A run's configuration: every parameter as a param, and config.json, which a resume reads back."""

from __future__ import annotations

import json
from pathlib import Path

from mlproject.config import JobConfig
from mlproject.record.reader import RunReader
from mlproject.record.tracker import Tracker

CONFIG_FILE = "config.json"


def log_config(tracker: Tracker, cfg: JobConfig, entry: str) -> None:
    """Every parameter as a param, and the resolved configuration with its entry point as config.json."""
    tracker.log_params(cfg.as_params())
    tracker.log_json(CONFIG_FILE, {"entry_point": entry, **cfg.as_params()})


def resumed_config(reader: RunReader, workdir: Path) -> JobConfig:
    """The configuration the run started with (its config.json), marked as resumed."""
    params = json.loads(reader.download(CONFIG_FILE, workdir).read_text())
    return JobConfig.from_params(params).replace(resume=reader.run.run_id)


def changed(given: JobConfig, resolved: JobConfig) -> dict[str, str]:
    """The params whose value the job resolved to something other than what it was given."""
    before, after = given.as_params(), resolved.as_params()
    return {k: v for k, v in after.items() if before[k] != v}
