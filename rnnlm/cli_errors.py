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


class BadValue(click.ClickException):
    """An option value that can never work (malformed, an unknown host): one line naming the option
    and the value, and exit status 2, as click gives for other bad options."""

    exit_code = 2

    def __init__(self, option: str, value: str, why: str):
        super().__init__(f"{option} {value!r}: {why}")


def option_error(option: str, value: str, why: str) -> click.ClickException:
    """A value that is well formed but does not work here and now (in use, not writable): exit status 1."""
    return click.ClickException(f"{option} {value!r}: {why}")


def check_output_file(option: str, path: str) -> None:
    """Fail now, not after hours of work, if `path` cannot be written: its directory must exist (it
    is not created) and take a new file (tried for real: root passes every permission check, yet
    cannot create files under /proc or on a read-only mount)."""
    import os
    import tempfile
    from pathlib import Path

    target = Path(path)
    if target.is_dir():
        raise option_error(option, path, "is a directory; give a file name")
    folder = target.parent
    if not folder.is_dir():
        raise option_error(option, path, f"directory {str(folder)!r} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".check", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise option_error(option, path, f"cannot write in {str(folder)!r} ({err.strerror})") from None


def progress_bar(length: int, label: str = "", **options):
    """A progress bar on stderr when it is a terminal; nothing at all on a pipe or a file, where a
    redrawn line would become one line per update."""
    import sys

    return click.progressbar(length=length, label=label, file=sys.stderr, width=30,
                             hidden=options.pop("hidden", False) or not sys.stderr.isatty(), **options)
