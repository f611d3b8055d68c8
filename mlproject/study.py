"""The LR study: the same job at several fixed LRs and at the finder's, as child runs of one parent run.

The parent runs the range test once and writes the plan (`study.json`); each member trains as a child run, in this
process, in parallel processes, or as a CI job of its own (stage=member); whichever member ends last writes the
comparison into the parent, read back from the tracking server.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from mlproject import markdown, pipeline, plots
from mlproject.config import ConfigError, JobConfig
from mlproject.errors import Preempted
from mlproject.session import Session

log = logging.getLogger(__name__)

FINDER = "lr=finder"
PLAN_FILE = "study.json"
BASE_COLUMNS = ["label", "lr_used", "lr_source", "status"]


@dataclass(frozen=True)
class Plan:
    """study.json: the parent, its members' labels, and the range test's answer the finder member trains at."""

    parent_run: str
    members: tuple[str, ...]
    finder: dict[str, object] = field(default_factory=dict)  # lr, lr_low, source, lr_suggested

    def as_json(self) -> dict[str, object]:
        return {"parent_run": self.parent_run, "members": list(self.members), "finder": self.finder}


@dataclass
class Member:
    """One member as the tracking server holds it."""

    label: str
    run_id: str
    status: str
    lr_used: float
    lr_source: str
    final: dict[str, float]
    history: list[dict[str, float]]
    seconds: float


def labels(lrs: Sequence[float], auto_lr: bool) -> tuple[str, ...]:
    return tuple(f"lr={lr:g}" for lr in lrs) + ((FINDER,) if auto_lr else ())


def member_config(cfg: JobConfig, plan: Plan, label: str) -> JobConfig:
    """A member's configuration: the study's, at its fixed LR, or at the parent's range test's answer."""
    if label not in plan.members:
        raise ConfigError("member", label, f"one of the study's members ({', '.join(plan.members)})")
    if label == FINDER:  # lr as lr_used shows it: the two params then read alike
        return cfg.replace(auto_lr=False, lr=float(f"{float(plan.finder['lr']):.6g}"))  # type: ignore[arg-type]
    return cfg.replace(auto_lr=False, lr=float(label.removeprefix("lr=")))


# --- the parent ------------------------------------------------------------------------------------------------


def plan_study(session: Session, lrs: Sequence[float]) -> Plan:
    """The range test (when auto_lr) in the parent, then the plan, logged as study.json."""
    cfg, parent = session.cfg, session.tracker
    finder: dict[str, object] = {}
    if cfg.auto_lr:
        choice = pipeline.find_lr(cfg, session.job, pipeline.runtime(cfg, session.job, parent), parent)
        assert choice.found is not None
        finder = {"lr": choice.lr, "lr_low": choice.lr_low, "source": choice.source,
                  "lr_suggested": choice.found.suggestion.lr}  # fmt: skip
    plan = Plan(parent.run_id, labels(lrs, cfg.auto_lr), finder)
    parent.log_params({"lrs": ",".join(f"{lr:g}" for lr in lrs), "members": str(len(plan.members))})
    parent.log_json(PLAN_FILE, plan.as_json())
    return plan


def run_all(session: Session, lrs: Sequence[float], parallel: int, argv: Sequence[str]) -> str:
    """Plan, train every member (in this process, or `parallel` at a time in processes of their own), compare."""
    plan = plan_study(session, lrs)
    if parallel > 1:
        run_in_processes(plan, parallel, argv)
    else:
        for label in plan.members:
            child = session.tracker.child(label)
            folder = session.workdir / child.run_id
            folder.mkdir()
            member_session = Session(member_config(session.cfg, plan, label), session.job, child, folder, None,
                                     session.here)  # fmt: skip
            run_member(member_session, plan, label, owned=True)
    return compare(session.tracker, session.cfg, plan)


def run_in_processes(plan: Plan, parallel: int, argv: Sequence[str]) -> None:
    """Each member as `compare --stage member`, `parallel` at a time; with several GPUs, each on one of them."""
    gpus = _gpu_count()
    pending = list(plan.members)
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < parallel:
            index = len(plan.members) - len(pending)
            env = dict(os.environ)
            env.pop("MLFLOW_RUN_ID", None)  # each member makes its own child run
            if gpus > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
            args = [*argv, "--stage", "member", "--parent-run", plan.parent_run, "--member", pending.pop(0)]
            running.append(subprocess.Popen([sys.executable, "-m", "mlproject", *args], env=env))
        running[0].wait()
        running = [p for p in running if p.poll() is None]


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --- a member --------------------------------------------------------------------------------------------------


def run_member(session: Session, plan: Plan, label: str, owned: bool = False) -> None:
    """Train one member in its child run; a failure is recorded there and does not stop the study. With `owned`,
    this process opened the child run and ends it; else the session ends it."""
    child = session.tracker
    child.set_tags({"mlflow.parentRunId": plan.parent_run, "study_parent": plan.parent_run, "study_member": label,
                    "mlflow.runName": label})  # fmt: skip
    if owned:
        pipeline.log_config(child, session.cfg, "compare")
    forced = None
    if label == FINDER:
        finder = plan.finder
        forced = pipeline.LRChoice(float(finder["lr"]), str(finder["source"]), float(finder["lr_low"]))  # type: ignore[arg-type]
        child.log_params({"lr_suggested": f"{float(finder['lr_suggested']):.6g}"})  # type: ignore[arg-type]
    try:
        pipeline.run(session, forced)
    except Preempted as exc:
        if owned:
            child.end("KILLED", error=f"{exc}; the study is rerun with compare")
        raise
    except Exception as exc:  # recorded in the child and the study; the other members go on
        log.error("%s failed: %s: %s", label, type(exc).__name__, exc)
        if not owned:
            raise
        child.end("FAILED", error=f"{type(exc).__name__}: {exc}")
        return
    if owned:
        child.end("FINISHED")


def finish_if_complete(session: Session, plan: Plan) -> None:
    """The last member to end writes the comparison into the parent (a second writer writes the same)."""
    members = session.tracker.study_members(plan.parent_run)
    done = {m.label for m in members if m.status in ("FINISHED", "FAILED", "KILLED")}
    if set(plan.members) <= done | {_label(session)}:
        compare(session.tracker.of_run(plan.parent_run), session.cfg, plan, ending=_label(session))


def _label(session: Session) -> str:
    return session.tracker.tags().get("study_member", "")


# --- the comparison --------------------------------------------------------------------------------------------


def figure_names(members: Sequence[Member]) -> list[str]:
    """The final figures any member reported (final_<validation value>, then the test values), in a stable order."""
    names = {k for m in members for k in m.final}
    return sorted(names, key=lambda k: (not k.startswith("final_"), k))


def rows(members: Sequence[Member], figures: list[str]) -> list[list[str]]:
    def fmt(value: float, digits: str = ".4f") -> str:
        return format(value, digits) if math.isfinite(value) else "-"

    return [
        [m.label, fmt(m.lr_used, ".3g"), m.lr_source, m.status]
        + [fmt(m.final.get(k, math.nan)) for k in figures]
        + [fmt(m.seconds, ".1f")]
        for m in members
    ]


def summary(members: Sequence[Member]) -> str:
    """The comparison as a markdown table."""
    figures = figure_names(members)
    cells = [[markdown.cell(text) for text in row] for row in rows(members, figures)]
    return markdown.table([*BASE_COLUMNS, *figures, "seconds"], cells)


def best(members: Sequence[Member], cfg: JobConfig) -> Member | None:
    """The finished member with the best final value of the monitored figure (final_<monitor>, or <monitor>)."""
    value = lambda m: m.final.get(f"final_{cfg.monitor}", m.final.get(cfg.monitor, math.nan))  # noqa: E731
    ranked = [m for m in members if m.status == "FINISHED" and math.isfinite(value(m))]
    if not ranked:
        return None
    return (min if cfg.monitor_mode == "min" else max)(ranked, key=value)


def compare(parent: object, cfg: JobConfig, plan: Plan, ending: str = "") -> str:
    """comparison.csv/.md/.png and the best member in the parent; the markdown table, in the plan's order. A member
    still marked RUNNING but `ending` is the one writing this: shown FINISHED."""
    found = {m.label: m for m in parent.study_members(plan.parent_run)}  # type: ignore[attr-defined]
    members = [found[label] for label in plan.members if label in found]
    for m in members:
        if m.label == ending and m.status == "RUNNING":
            m.status = "FINISHED"
    figures = figure_names(members)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*BASE_COLUMNS, *figures, "seconds"])
    writer.writerows(rows(members, figures))
    table = summary(members)
    files: dict[str, bytes | str] = {"comparison.csv": buf.getvalue(), "comparison.md": table}
    curves = {m.label: m.history for m in members if m.history}
    if curves:
        files["comparison.png"] = plots.comparison(curves, cfg.monitor, highlight=FINDER)
    parent.log_files(files)  # type: ignore[attr-defined]
    failed = sum(m.status != "FINISHED" for m in members) + len(plan.members) - len(members)
    parent.set_tags({"members_failed": str(failed), "study_complete": "true"})  # type: ignore[attr-defined]
    top = best(members, cfg)
    if top is not None:
        key = f"final_{cfg.monitor}" if f"final_{cfg.monitor}" in top.final else cfg.monitor
        parent.set_tags({"best_member": top.label, f"best_{key}": f"{top.final[key]:.4f}"})  # type: ignore[attr-defined]
    return table
