"""The job's log lines: time, level and source on each, to stderr; the level from -v or LR_FINDER_LOG_LEVEL (so it
reaches the job under `mlflow run` and in the container); the libraries' own chatter kept to warnings."""

from __future__ import annotations

import logging
import os
import sys

LEVEL_ENV = "LR_FINDER_LOG_LEVEL"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Lightning reports every Trainer it builds and MLflow every database it migrates, at INFO: noise beside the job's.
LIBRARIES = ("pytorch_lightning", "lightning", "lightning_fabric", "mlflow", "alembic", "torch")


def level(verbose: bool, environ: dict[str, str] | os._Environ = os.environ) -> int:
    if verbose:
        return logging.DEBUG
    name = environ.get(LEVEL_ENV, "INFO").strip().upper()
    return logging.getLevelName(name) if isinstance(logging.getLevelName(name), int) else logging.INFO


def _quiet_libraries(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.name.startswith(LIBRARIES)


def setup(verbose: bool) -> None:
    """Before any library is imported, so that they log through this handler (Lightning adds its own otherwise)."""
    chosen = level(verbose)
    if chosen > logging.DEBUG:  # MLflow configures its own handler at import: this is the one way in
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=chosen, format=FORMAT, stream=sys.stderr, force=True)
    if chosen > logging.DEBUG:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_libraries)


def adopt(name: str) -> None:
    """A library that adds a console handler of its own when imported (Lightning does, printing `INFO: ...` lines):
    its records go to this job's handler instead, under the same filter, once the job has set one up."""
    if not logging.getLogger().handlers:  # not the job's command line: leave the library as it set itself up
        return
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
