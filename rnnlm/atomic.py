"""Writing a file so that a crash leaves either the old file or the new one, never a torn one.

The bytes go to a temporary file in the same directory, are fsynced, the temporary file is renamed
over the target (os.replace) and the directory fsynced, so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_file(path: str | Path, text: bool = False, private: bool = False) -> Iterator[IO]:
    """A file object to write `path`'s new contents to; they replace the old ones on leaving the block.

    `private` keeps the file readable by its owner only (what mkstemp makes); otherwise it gets the
    mode a plain open() would give. On an error the temporary file is removed and the target untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if not private:
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8", "newline": "\n"} if text else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path, text=True) as f:
        f.write(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
