"""The LR study: the same job at several fixed LRs and at the finder's, as child runs of one parent run."""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlproject import markdown, pipeline, plots
from mlproject.config import JobConfig
from mlproject.errors import Preempted
from mlproject.task import Task
from mlproject.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Member:
    label: str
    lr_source: str
    status: str = "FAILED"
    run_id: str = ""
    lr_used: float = float("nan")
    final: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""


def run_study(cfg: JobConfig, job: Task, lrs: tuple[float, ...], parent: Tracker, workdir: Path) -> list[Member]:
    """One child run per LR (and one for the finder when cfg.auto_lr); a failing child does not stop the rest."""
    plan = [(f"lr={lr:g}", cfg.replace(auto_lr=False, lr=lr)) for lr in lrs]
    if cfg.auto_lr:
        plan.append(("lr=finder", cfg.replace(auto_lr=True)))
    members = [run_member(label, member_cfg, job, parent, workdir) for label, member_cfg in plan]
    log_comparison(parent, members, cfg)
    return members


def run_member(label: str, cfg: JobConfig, job: Task, parent: Tracker, workdir: Path) -> Member:
    member = Member(label, "finder" if cfg.auto_lr else "fixed", lr_used=math.nan if cfg.auto_lr else cfg.lr)
    child = parent.child(label)
    member.run_id = child.run_id
    start = time.perf_counter()
    try:
        pipeline.log_config(child, cfg, "compare")
        child.set_tags({"study_parent": parent.run_id, "study_member": label})
        result = pipeline.run(cfg, job, child, workdir / child.run_id)
    except Preempted:
        child.end("KILLED", error="stopped by a signal")
        raise
    except Exception as exc:  # recorded in the child and the study; the other members go on
        member.error, member.seconds = f"{type(exc).__name__}: {exc}", time.perf_counter() - start
        log.error("%s failed: %s", label, member.error)
        child.end("FAILED", error=member.error)
        return member
    member.seconds = time.perf_counter() - start
    member.status, member.lr_used, member.lr_source = "FINISHED", result.choice.lr, result.choice.source
    member.final, member.history = result.final, result.history
    child.end("FINISHED")
    return member


BASE_COLUMNS = ["label", "lr_used", "lr_source", "status"]


def figure_names(members: list[Member]) -> list[str]:
    """The final figures any member reported (final_<validation value>, then the test values), in a stable order."""
    names = {k for m in members for k in m.final}
    return sorted(names, key=lambda k: (not k.startswith("final_"), k))


def rows(members: list[Member], figures: list[str]) -> list[list[str]]:
    def fmt(value: float, digits: str = ".4f") -> str:
        return format(value, digits) if math.isfinite(value) else "-"

    return [
        [m.label, fmt(m.lr_used, ".3g"), m.lr_source, m.status]
        + [fmt(m.final.get(k, math.nan)) for k in figures]
        + [fmt(m.seconds, ".1f")]
        for m in members
    ]


def summary(members: list[Member]) -> str:
    """The comparison as a markdown table."""
    figures = figure_names(members)
    cells = [[markdown.cell(text) for text in row] for row in rows(members, figures)]
    return markdown.table([*BASE_COLUMNS, *figures, "seconds"], cells)


def best(members: list[Member], cfg: JobConfig) -> Member | None:
    """The finished member with the best final value of the monitored figure (final_<monitor>, or <monitor>)."""
    key = f"final_{cfg.monitor}"
    ranked = [
        m
        for m in members
        if m.status == "FINISHED" and math.isfinite(m.final.get(key, m.final.get(cfg.monitor, math.nan)))
    ]
    if not ranked:
        return None
    value = lambda m: m.final.get(key, m.final.get(cfg.monitor, math.nan))  # noqa: E731
    return (min if cfg.monitor_mode == "min" else max)(ranked, key=value)


def log_comparison(parent: Tracker, members: list[Member], cfg: JobConfig) -> None:
    figures = figure_names(members)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*BASE_COLUMNS, *figures, "seconds"])
    writer.writerows(rows(members, figures))
    curves = {m.label: m.history for m in members if m.history}
    finder = next((m.label for m in members if m.lr_source in ("finder", "fallback")), "")
    files: dict[str, bytes | str] = {"comparison.csv": buf.getvalue(), "comparison.md": summary(members)}
    if curves:
        files["comparison.png"] = plots.comparison(curves, cfg.monitor, highlight=finder)
    parent.log_files(files)
    finished = [m for m in members if m.status == "FINISHED"]
    parent.log_params({"members": str(len(members)), "members_failed": str(len(members) - len(finished))})
    top = best(members, cfg)
    if top is not None:
        key = f"final_{cfg.monitor}" if f"final_{cfg.monitor}" in top.final else cfg.monitor
        parent.log_params({"best_member": top.label, f"best_{key}": f"{top.final[key]:.4f}"})
