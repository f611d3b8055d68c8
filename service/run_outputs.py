"""What `lr-finder run` leaves once the container is done: a stopped run ended KILLED, the image's tags on the run,
the --outputs folder for a CI artifact and the --summary markdown; said back as lines, printed by the command."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlproject import markdown
from mlproject.record.environment import run_url
from service.spec import scrub

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

SUMMARY_FIGURES = ("lr_suggested", "lr_used", "lr_source", "test_acc", "test_loss", "final_val_acc", "final_val_loss")
OUTPUT_ARTIFACTS = ("lr_find/loss_vs_lr.png", "lr_find/summary.json", "study.json")  # --outputs, when the run has them


@dataclass(frozen=True)
class Record:
    """Where `run` reports a run once the container is done: the server, the image, the link, the files."""

    uri: str
    image: str
    image_id: str
    revision: str  # the commit the image was built from; '' or 'unknown' when the build had none
    ui_url: str
    summary: Path | None
    outputs: Path | None


def summary_markdown(run_id: str, status: str, link: str, figures: Mapping[str, str]) -> str:
    """A CI job summary: the run, its link, the suggested and used LR and the final metrics ('-' when absent)."""
    title = f"[`{run_id}`]({link})" if link else f"`{run_id}`"
    row = [markdown.cell(figures.get(k, "") or "-") for k in SUMMARY_FIGURES]
    return f"### lr-finder run {title}: {markdown.cell(status)}\n\n" + markdown.table(SUMMARY_FIGURES, [row])


def run_record(run_id: str, experiment_id: str, status: str, link: str) -> dict[str, str]:
    """--outputs' run.json: what a CI step needs to find the run."""
    return {"run_id": run_id, "experiment_id": experiment_id, "status": status, "link": link}


def record(rec: Record, run_id: str, stopped: bool) -> list[str]:
    """From this machine: end a stopped run KILLED, tag the image, write the outputs and the summary; the lines to
    tell the user (the run's link; a server this machine cannot reach is one line, not a failure)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(rec.uri)
    try:
        run = _close_and_tag(client, rec, run_id, stopped)
        link = run_url(rec.ui_url, run.info.experiment_id, run_id)
        facts = run_record(run_id, run.info.experiment_id, run.info.status, link)
        written = _write_outputs(client, rec.outputs, facts) if rec.outputs is not None else []
    except MlflowException as exc:
        return [f"run {run_id}: cannot reach the tracking server from here: {scrub(exc.message, [rec.uri])}"]
    where = link or f"(experiment {run.info.experiment_id}; --ui-url for a link)"
    lines = [f"run {run_id} {run.info.status} {where}"]
    if written:
        lines.append(f"wrote {', '.join(map(str, written))}")
    if rec.summary is not None:
        figures = {**run.data.params, **{k: f"{v:.4g}" for k, v in run.data.metrics.items()}}
        with rec.summary.open("a") as out:
            out.write(summary_markdown(run_id, run.info.status, link, figures))
    return lines


def _close_and_tag(client: MlflowClient, rec: Record, run_id: str, stopped: bool) -> Run:
    """The run as it ends: KILLED when the container was stopped, tagged with the image it ran in."""
    tags = {"mlflow.docker.image.uri": rec.image, "mlflow.docker.image.id": rec.image_id}
    if rec.revision not in ("", "unknown"):  # the image has no .git: the build recorded the commit
        tags["mlflow.source.git.commit"] = rec.revision
    if stopped and client.get_run(run_id).info.status != "KILLED":
        client.set_terminated(run_id, "KILLED")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return client.get_run(run_id)


def _write_outputs(client: MlflowClient, folder: Path, facts: dict[str, str]) -> list[Path]:
    """run.json, and those of OUTPUT_ARTIFACTS the run has, kept at their artifact paths under folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(facts, indent=2) + "\n")
    run_id = facts["run_id"]
    present = _artifacts(client, run_id, {path.rpartition("/")[0] for path in OUTPUT_ARTIFACTS})
    found = [path for path in OUTPUT_ARTIFACTS if path in present]
    for path in found:
        into = (folder / path).parent  # a single file lands in dst_path itself, without its artifact folders
        into.mkdir(parents=True, exist_ok=True)
        client.download_artifacts(run_id, path, str(into))
    return [folder / "run.json", *(folder / path for path in found)]


def _artifacts(client: MlflowClient, run_id: str, parents: Iterable[str]) -> set[str]:
    """The artifact paths directly under each of the parent folders ('' is the run's root)."""
    return {item.path for parent in parents for item in client.list_artifacts(run_id, parent or None)}
