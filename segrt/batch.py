"""``segrt batch`` (issue 13): being written; the CLI hook is in place so it lands without touching cli.py again."""

from __future__ import annotations

from segrt.errors import UsageError


def add_arguments(parser) -> None:
    """The subcommand's arguments (called by :func:`segrt.cli.build_parser`)."""


def run_cli(a) -> int:
    raise UsageError("segrt batch is not available in this version")
