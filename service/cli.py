"""The host-side command line: `lr-finder build|run|doctor` for the container, `lr-finder server|report` for tracking.

The only module that prints or exits; commands live in container_cli.py and server_cli.py.
"""

from __future__ import annotations

import sys

import click

from mlproject import __version__
from service.container_cli import container_commands
from service.deploy_cli import deploy_commands
from service.server_cli import server_commands


@click.group()
@click.version_option(__version__, prog_name="lr-finder", message="%(prog)s %(version)s")
def cli() -> None:
    """Build, launch and watch the lr-finder training container and the team's MLflow tracking server."""


for command in (*container_commands, *server_commands, *deploy_commands):
    cli.add_command(command)


def main() -> None:
    sys.exit(cli.main(prog_name="lr-finder", standalone_mode=True))
