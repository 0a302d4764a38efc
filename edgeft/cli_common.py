"""What every ``edgeft`` subcommand shares: one-line errors and comma-separated options."""

from __future__ import annotations

import sys

import click

from edgeft.errors import EdgeftError


class Command(click.Command):
    """Turn EdgeftError into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeftError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


def split_list(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []
