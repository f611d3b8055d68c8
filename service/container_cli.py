"""Container commands (build, run, doctor). Filled in with the GPU-container work."""

import click

container_commands: list[click.Command] = []
