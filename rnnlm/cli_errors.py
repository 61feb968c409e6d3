"""What every `rnnlm` command does with the errors a user can cause: one line, exit status 1."""

from __future__ import annotations

import functools

import click

from .checkpoint import CheckpointError
from .corpus import CorpusError


def friendly_errors(command):
    """Turn bad input (missing, empty, malformed, non-UTF-8 files, damaged models) into one line
    starting `Error:` and exit status 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (CorpusError, CheckpointError, ValueError) as err:
            raise click.ClickException(str(err)) from None
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            raise click.ClickException(f"{where}{err.strerror or err}") from None

    return wrapper


def say(message: str) -> None:
    """Progress and status go to stderr, so stdout stays clean for --json."""
    click.echo(message, err=True)
