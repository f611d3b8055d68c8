"""The LR study: the same job at several fixed LRs and at the finder's, as child runs of one parent run."""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlproject import data, markdown, pipeline, plots
from mlproject.config import JobConfig
from mlproject.errors import Preempted
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


def run_study(
    cfg: JobConfig, lrs: tuple[float, ...], source: data.Source, parent: Tracker, workdir: Path
) -> list[Member]:
    """One child run per LR (and one for the finder when cfg.auto_lr); a failing child does not stop the rest."""
    plan = [(f"lr={lr:g}", cfg.replace(auto_lr=False, lr=lr)) for lr in lrs]
    if cfg.auto_lr:
        plan.append(("lr=finder", cfg.replace(auto_lr=True)))
    members = [run_member(label, member_cfg, source, parent, workdir) for label, member_cfg in plan]
    log_comparison(parent, members)
    return members


def run_member(label: str, cfg: JobConfig, source: data.Source, parent: Tracker, workdir: Path) -> Member:
    member = Member(label, "finder" if cfg.auto_lr else "fixed", lr_used=math.nan if cfg.auto_lr else cfg.lr)
    child = parent.child(label)
    member.run_id = child.run_id
    start = time.perf_counter()
    try:
        pipeline.log_config(child, cfg, "compare")
        child.set_tags({"study_parent": parent.run_id, "study_member": label})
        result = pipeline.run(cfg, source, child, workdir / child.run_id)
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


COLUMNS = ["label", "lr_used", "lr_source", "status", "final_val_acc", "test_acc", "test_loss", "seconds"]


def rows(members: list[Member]) -> list[list[str]]:
    def fmt(value: float, digits: str = ".4f") -> str:
        return format(value, digits) if math.isfinite(value) else "-"

    return [
        [
            m.label, fmt(m.lr_used, ".3g"), m.lr_source, m.status, fmt(m.final.get("final_val_acc", math.nan)),
            fmt(m.final.get("test_acc", math.nan)), fmt(m.final.get("test_loss", math.nan)), fmt(m.seconds, ".1f"),
        ]
        for m in members
    ]  # fmt: skip


def summary(members: list[Member]) -> str:
    """The comparison as a markdown table."""
    return markdown.table(COLUMNS, [[markdown.cell(text) for text in row] for row in rows(members)])


def log_comparison(parent: Tracker, members: list[Member]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    writer.writerows(rows(members))
    curves = {m.label: m.history for m in members if m.history}
    finder = next((m.label for m in members if m.lr_source in ("finder", "fallback")), "")
    files: dict[str, bytes | str] = {"comparison.csv": buf.getvalue(), "comparison.md": summary(members)}
    if curves:
        files["comparison.png"] = plots.comparison(curves, highlight=finder)
    parent.log_files(files)
    finished = [m for m in members if m.status == "FINISHED"]
    parent.log_params({"members": str(len(members)), "members_failed": str(len(members) - len(finished))})
    if finished:
        best = max(finished, key=lambda m: m.final["test_acc"])
        parent.log_params({"best_member": best.label, "best_test_acc": f"{best.final['test_acc']:.4f}"})
