"""Reading text: one sentence per line, whitespace-separated tokens, `</s>` closing every line.

The end-of-sentence token is a word like any other: it is predicted, scored and counted in
perplexity, as the reference toolkit does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

EOS = "</s>"


class CorpusError(ValueError):
    """A text file that cannot be used: missing, unreadable, empty or not UTF-8."""


def tokenize_line(line: str) -> list[str]:
    """The tokens of one sentence, `</s>` included."""
    return line.split() + [EOS]


def read_lines(path: str | Path) -> list[str]:
    """All non-empty lines of a UTF-8 text file, with a clear error for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise CorpusError(f"{path}: {err.strerror}") from None
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        raise CorpusError(f"{path}: no text (the file is empty or blank)")
    return lines


def read_tokens(path: str | Path) -> list[str]:
    """The whole file as one token stream, `</s>` after every sentence."""
    return [token for line in read_lines(path) for token in tokenize_line(line)]


def iter_sentences(path: str | Path) -> Iterator[list[str]]:
    """Sentences as token lists without `</s>` (for the n-gram side, which adds its own markers)."""
    for line in read_lines(path):
        yield line.split()
