"""The host-side command line: `lr-finder build|run|doctor` for the container, `lr-finder server|report` for tracking.

The group only: the commands live in the *_cli modules, which alone print; main() exits.
"""

from __future__ import annotations

import sys

import click

from mlproject import __version__
from service.container_cli import container_commands
from service.deploy_cli import deploy_commands
from service.doctor_cli import doctor_commands
from service.report_cli import report_commands
from service.server_cli import server_commands


@click.group()
@click.version_option(__version__, prog_name="lr-finder", message="%(prog)s %(version)s")
def cli() -> None:
    """Build, launch and watch the lr-finder training container and the team's MLflow tracking server."""


for command in (*container_commands, *doctor_commands, *server_commands, *report_commands, *deploy_commands):
    cli.add_command(command)


def main() -> None:
    sys.exit(cli.main(prog_name="lr-finder", standalone_mode=True))
