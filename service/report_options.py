"""What `lr-finder report` accepts on its command line (ValueError says what is accepted), and where its run links
point."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from service.uris import where

HTTP_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2", "postgresql+psycopg")
URI_HELP = "use http(s)://HOST:PORT (a tracking server), sqlite:///FILE or postgresql://USER@HOST/DB"
_RUN_ID = re.compile(r"[A-Za-z0-9][\w\-]{0,255}")  # MLflow's own rule for a run id
_METRIC = re.compile(r"[\w\-./ ]{1,250}")  # MLflow's own rule for a metric key


def tracking_uri(uri: str) -> str:
    """A tracking URI the report can read: a server over http(s), or an MLflow database."""
    parts = urlsplit(uri)
    if parts.scheme in HTTP_SCHEMES and parts.hostname:
        return uri
    if parts.scheme in DATABASE_SCHEMES and (parts.scheme != "sqlite" or uri.startswith("sqlite:///")):
        return uri
    raise ValueError(f"{where(uri)!r}: {URI_HELP}")


def ui_url(url: str) -> str:
    """A base URL of the MLflow UI for the run links ('' for none)."""
    parts = urlsplit(url)
    if url and not (parts.scheme in HTTP_SCHEMES and parts.hostname):
        raise ValueError(f"{where(url)!r}: use http(s)://HOST[:PORT], the address people open the UI at")
    return url


def link_base(ui_url: str, tracking_uri: str) -> str:
    """Where the run links point: --ui-url, else a tracking server's own address without its user information or
    query, which may hold credentials; '' (run ids, no links) for a database."""
    if ui_url or urlsplit(tracking_uri).scheme not in HTTP_SCHEMES:
        return ui_url
    return where(tracking_uri)


def experiment_name(name: str) -> str:
    """An experiment's name: anything but blank."""
    if not name.strip():
        raise ValueError("an empty name: give the experiment's name as the MLflow UI shows it")
    return name


def run_id(text: str) -> str:
    """A run id as MLflow allows it, which also keeps it safe inside a search filter's quotes."""
    if not _RUN_ID.fullmatch(text):
        raise ValueError(f"{text!r}: a run id is letters, digits, _ and - (the UI shows it on the run's page)")
    return text


def metric_key(key: str) -> str:
    """A metric name as MLflow allows it."""
    if not _METRIC.fullmatch(key):
        raise ValueError(f"{key!r}: a metric name is letters, digits, _ - . / and spaces (e.g. test_acc, val_loss)")
    return key
