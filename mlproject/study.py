"""The LR study: the same job at several fixed LRs and at the finder's, as child runs of one parent run.

The parent runs the range test once and writes the plan (`study.json`); each member trains as a child run, in this
process (on every rank of a job of several processes), in parallel processes, or as a CI job of its own
(stage=member); whichever member ends last writes the comparison into the parent, read back from the tracking server.
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
from dataclasses import dataclass, replace

from mlproject import markdown, pipeline, plots
from mlproject.config import LR_FREE, ConfigError, JobConfig
from mlproject.errors import Preempted
from mlproject.finder.result import LRChoice
from mlproject.processes import ranks, threads
from mlproject.record import runconfig, stores
from mlproject.record.names import storable
from mlproject.record.reader import RunReader, RunView
from mlproject.record.tracker import Tracker
from mlproject.session import Session
from mlproject.training import task

log = logging.getLogger(__name__)

FINDER = "lr=finder"
PLAN_FILE = "study.json"
BASE_COLUMNS = ["label", "lr_used", "lr_source", "status"]
MEMBER_TAG = "study_member"
# The study's own options: a member process gets the study's command line without them.
STUDY_OPTIONS = ("--stage", "--parallel", "--parent-run", "--member")


@dataclass(frozen=True)
class FinderAnswer:
    """The parent's range test, as the finder member trains at it."""

    lr: float  # the LR the fit uses (the one-cycle peak)
    lr_low: float
    source: str
    lr_suggested: float


@dataclass(frozen=True)
class Plan:
    """study.json: the parent, its members' labels, and the range test's answer the finder member trains at."""

    parent_run: str
    members: tuple[str, ...]
    finder: FinderAnswer | None = None

    def as_json(self) -> dict[str, object]:
        finder = vars(self.finder) if self.finder is not None else {}
        return {"parent_run": self.parent_run, "members": list(self.members), "finder": finder}


@dataclass(frozen=True)
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


def labels(lrs: Sequence[float], auto_lr: bool, lr_free: Sequence[str] = ()) -> tuple[str, ...]:
    return tuple(f"lr={lr:g}" for lr in lrs) + ((FINDER,) if auto_lr else ()) + tuple(lr_free)


def member_config(cfg: JobConfig, plan: Plan, label: str) -> JobConfig:
    """A member's configuration: the study's, at its fixed LR, at the parent's range test's answer, or with an
    LR-free optimizer at its own LR and schedule (its label names it)."""
    if label not in plan.members:
        raise ConfigError("member", label, f"one of the study's members ({', '.join(plan.members)})")
    if label in LR_FREE:
        return cfg.replace(auto_lr=False, optimizer=label, lr=0.0, schedule="auto")
    if label != FINDER:
        return cfg.replace(auto_lr=False, lr=float(label.removeprefix("lr=")))
    if plan.finder is None:
        raise ConfigError("member", label, "a member of a study planned with auto_lr=true")
    return cfg.replace(auto_lr=False, lr=float(f"{plan.finder.lr:.6g}"))  # as lr_used shows it: the params read alike


def read_plan(tracking_uri: str, parent_run: str) -> Plan:
    """The plan a member belongs to, read from its parent run's study.json."""
    found = stores.read_json(tracking_uri, parent_run, PLAN_FILE)
    if found is None:
        raise ConfigError("parent_run", parent_run, f"a study's parent run (one with {PLAN_FILE})")
    answer = found.get("finder") or {}
    finder = None
    if answer:
        lr, low, suggested = (float(answer[k]) for k in ("lr", "lr_low", "lr_suggested"))
        finder = FinderAnswer(lr, low, str(answer["source"]), suggested)
    return Plan(found["parent_run"], tuple(found["members"]), finder)


def member_argv(argv: Sequence[str]) -> list[str]:
    """The command line a member process gets: the study's, less its own stage and parallelism."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in STUDY_OPTIONS:
            skip = True
        elif arg.split("=", 1)[0] not in STUDY_OPTIONS:
            out.append(arg)
    return out


# --- the parent ------------------------------------------------------------------------------------------------


def plan_study(session: Session, lrs: Sequence[float], lr_free: Sequence[str] = ()) -> Plan:
    """The range test (when auto_lr) in the parent, then the plan, logged as study.json; every rank gets rank 0's.
    `lr_free`: LR-free optimizers (config.LR_FREE) to train as members of their own, for the built-in networks."""
    cfg, parent = session.cfg, session.tracker
    finder = None
    if cfg.auto_lr:
        choice = pipeline.lr_find(session)
        finder = FinderAnswer(choice.lr, choice.lr_low, choice.source, choice.suggested)
    plan = ranks.share(Plan(parent.run_id, labels(lrs, cfg.auto_lr, lr_free), finder), session.here)
    study_params = {"lrs": ",".join(f"{lr:g}" for lr in lrs), "lr_free": ",".join(lr_free)}
    parent.log_params({**study_params, "members": str(len(plan.members))})
    parent.log_json(PLAN_FILE, plan.as_json())
    return plan


def run_all(
    session: Session, lrs: Sequence[float], parallel: int, argv: Sequence[str], lr_free: Sequence[str] = ()
) -> str:
    """Plan, train every member (in this process, or `parallel` at a time in processes of their own), compare; the
    comparison's table ("" on ranks other than 0)."""
    plan = plan_study(session, lrs, lr_free)
    if parallel > 1:
        run_in_processes(plan, parallel, argv)
    else:
        for index, label in enumerate(plan.members):
            child = session.tracker.child(label)
            folder = session.workdir / f"member-{index}"
            folder.mkdir()
            cfg = member_config(session.cfg, plan, label)
            job = task.build(cfg) if cfg.optimizer != session.cfg.optimizer else session.job  # an LR-free member's
            member = Session(cfg, job, child, folder, None, session.here)
            run_member(member, plan, label, owned=True)
    if not session.here.zero:
        return ""
    return compare(session.tracker, session.reads(), session.cfg, plan)


def run_in_processes(plan: Plan, parallel: int, argv: Sequence[str]) -> None:
    """Each member as `compare --stage member`, `parallel` at a time; with several GPUs, each on one of them."""
    gpus = _gpu_count()
    shared = threads.for_children(min(parallel, len(plan.members)), "study members at a time")
    pending = list(plan.members)
    running: list[subprocess.Popen[bytes]] = []
    while pending or running:
        while pending and len(running) < parallel:
            index = len(plan.members) - len(pending)
            env = {**os.environ, **shared}
            env.pop("MLFLOW_RUN_ID", None)  # each member makes its own child run
            if gpus > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
            args = [*argv, "--stage", "member", "--parent-run", plan.parent_run, "--member", pending.pop(0)]
            running.append(subprocess.Popen([sys.executable, "-m", "mlproject", *args], env=env))
        running[0].wait()
        running = [p for p in running if p.poll() is None]


def _gpu_count() -> int:
    import torch  # loaded by the job already; kept here so that planning a study reads as what it does

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --- a member --------------------------------------------------------------------------------------------------


def run_member(session: Session, plan: Plan, label: str, owned: bool = False) -> None:
    """Train one member in its child run; a failure is recorded there and does not stop the study. With `owned`,
    this process opened the child run and ends it; else the session ends it."""
    child = session.tracker
    child.set_tags(
        {
            "mlflow.parentRunId": plan.parent_run,
            "study_parent": plan.parent_run,
            MEMBER_TAG: label,
            "mlflow.runName": label,
        }
    )
    if owned:
        runconfig.log_config(child, session.cfg, "compare")
    forced = None
    if label == FINDER and plan.finder is not None:
        finder = plan.finder
        forced = LRChoice(finder.lr, finder.source, finder.lr_low)
        child.log_params({"lr_suggested": f"{finder.lr_suggested:.6g}"})
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


def finish_if_complete(session: Session, plan: Plan, label: str) -> None:
    """The last member to end (`label`, this one) writes the comparison into the parent (a second writer writes the
    same)."""
    reader = session.reads()
    done = {m.label for m in members(reader, plan.parent_run) if m.status in ("FINISHED", "FAILED", "KILLED")}
    if set(plan.members) <= done | {label}:
        compare(session.tracker.of_run(plan.parent_run), reader, session.cfg, plan, ending=label)


# --- the comparison --------------------------------------------------------------------------------------------


def members(reader: RunReader, parent_run: str) -> list[Member]:
    """The parent's child runs as study members: label, status, LR, final figures, per-epoch values, seconds."""
    return [member(reader, run) for run in reader.children(parent_run) if MEMBER_TAG in run.tags]


def member(reader: RunReader, run: RunView) -> Member:
    params = run.params
    final = {k: float(v) for k, v in params.items() if k.startswith(("final_", "test_")) and _is_number(v)}
    history: dict[int, dict[str, float]] = {}
    for key in ("val_acc", "val_loss", *(k.removeprefix("final_") for k in final if k.startswith("final_"))):
        for step, value in reader.history(run.run_id, key):
            history.setdefault(step, {})[key] = value
    return Member(
        label=run.tags[MEMBER_TAG],
        run_id=run.run_id,
        status=run.status,
        lr_used=float(params.get("lr_used", "nan")),
        lr_source=params.get("lr_source", ""),
        final=final,
        history=[history[step] for step in sorted(history)],
        seconds=run.seconds,
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def figure_names(found: Sequence[Member]) -> list[str]:
    """The final figures any member reported (final_<validation value>, then the test values), in a stable order."""
    names = {k for m in found for k in m.final}
    return sorted(names, key=lambda k: (not k.startswith("final_"), k))


def rows(found: Sequence[Member], figures: list[str]) -> list[list[str]]:
    def fmt(value: float, digits: str = ".4f") -> str:
        return format(value, digits) if math.isfinite(value) else "-"

    return [
        [m.label, fmt(m.lr_used, ".3g"), m.lr_source, m.status]
        + [fmt(m.final.get(k, math.nan)) for k in figures]
        + [fmt(m.seconds, ".1f")]
        for m in found
    ]


def summary(found: Sequence[Member]) -> str:
    """The comparison as a markdown table."""
    figures = figure_names(found)
    cells = [[markdown.cell(text) for text in row] for row in rows(found, figures)]
    return markdown.table([*BASE_COLUMNS, *figures, "seconds"], cells)


def best(found: Sequence[Member], cfg: JobConfig) -> Member | None:
    """The finished member with the best final value of the monitored figure (final_<monitor>, or <monitor>), by
    the names MLflow stored."""
    monitor = storable(cfg.monitor)
    value = lambda m: m.final.get(f"final_{monitor}", m.final.get(monitor, math.nan))  # noqa: E731
    ranked = [m for m in found if m.status == "FINISHED" and math.isfinite(value(m))]
    if not ranked:
        return None
    return (min if cfg.monitor_mode == "min" else max)(ranked, key=value)


def compare(parent: Tracker, reader: RunReader, cfg: JobConfig, plan: Plan, ending: str = "") -> str:
    """comparison.csv/.md/.png and the best member in the parent; the markdown table, in the plan's order. A member
    still marked RUNNING but `ending` is the one writing this: shown FINISHED."""
    by_label = {m.label: m for m in members(reader, plan.parent_run)}
    found = [by_label[label] for label in plan.members if label in by_label]
    found = [replace(m, status="FINISHED") if m.label == ending and m.status == "RUNNING" else m for m in found]
    figures = figure_names(found)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*BASE_COLUMNS, *figures, "seconds"])
    writer.writerows(rows(found, figures))
    table = summary(found)
    files: dict[str, bytes | str] = {"comparison.csv": buf.getvalue(), "comparison.md": table}
    curves = {m.label: m.history for m in found if m.history}
    if curves:
        files["comparison.png"] = plots.comparison(curves, storable(cfg.monitor), highlight=FINDER)
    parent.log_files(files)
    failed = sum(m.status != "FINISHED" for m in found) + len(plan.members) - len(found)
    parent.set_tags({"members_failed": str(failed), "study_complete": "true"})
    top = best(found, cfg)
    if top is not None:
        monitor = storable(cfg.monitor)
        key = f"final_{monitor}" if f"final_{monitor}" in top.final else monitor
        parent.set_tags({"best_member": top.label, f"best_{key}": f"{top.final[key]:.4f}"})
    return table
