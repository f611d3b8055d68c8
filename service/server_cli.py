"""Tracking-server commands (server, report). Filled in with the shared-tracking-server work."""

import click

server_commands: list[click.Command] = []
