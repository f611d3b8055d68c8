"""`lr-finder doctor`: is this machine ready for `lr-finder run`? Each check one line, a fix under each failure."""

from __future__ import annotations

from typing import Any

import click

from service import launcher, probes, spec
from service.container_options import container_options, fail, job_options, plan


@click.command("doctor")
@container_options
@job_options
def doctor_command(**options: Any) -> None:
    """Check what `lr-finder run` with these options needs: the Docker engine, the image, a GPU in a container, the
    tracking server, and the data and code the job would read (the job's own check of -P, --code and
    --entry-point, with run's mounts); exit 1 if any fails."""
    job_spec, command, env = plan(**options)
    try:
        client = launcher.connect()
    except launcher.LaunchError as exc:
        _report([("docker engine", False, str(exc), spec.ENGINE_HINT)])
    results = [("docker engine", True, launcher.engine_version(client), "")]
    try:
        info = launcher.image_info(client, job_spec.image)
    except launcher.LaunchError as exc:
        _report([*results, ("image", False, str(exc), f"lr-finder build --tag {job_spec.image}")])
    results.append(("image", True, f"{job_spec.image} ({info.id[:19]}, user {info.user})", ""))
    problem = spec.tracking_problem(options["tracking_uri"])
    for probe in probes.doctor_probes(job_spec, command.check):
        if probe.name == "tracking server" and problem:
            results.append((probe.name, False, problem, probe.hint))
            continue
        ok, answer = launcher.probe(client, job_spec, env, probe)
        results.append((probe.name, ok, spec.scrub(answer, spec.secret_values(env)), probe.hint))
    _report(results)


def _report(results: list[tuple[str, bool, str, str]]) -> None:
    """One line per check, a fix under each failure; exit 1 if any failed."""
    for check, ok, detail, hint in results:
        click.echo(f"{'ok  ' if ok else 'FAIL'}  {check}: {detail}")
        if not ok:
            click.echo(f"      fix: {hint}")
    failed = sum(not ok for _, ok, _, _ in results)
    if failed:
        raise fail(f"{failed} check(s) failed")


doctor_commands: list[click.Command] = [doctor_command]
