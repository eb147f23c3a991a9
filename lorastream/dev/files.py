"""The small file chores of the dev room's services: read a one-line state file, write one
atomically, hold a lock file, quote the end of a log."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["locked", "read_stripped", "tail_text", "write_atomic"]


def read_stripped(path: Path) -> str | None:
    """The text of ``path`` without surrounding whitespace; None if it cannot be read."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``, so
    a reader sees the old content or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def tail_text(text: str, lines: int) -> str:
    """The last ``lines`` lines of ``text``, for an error message that quotes a log."""
    return "\n".join(text.rstrip().splitlines()[-lines:])


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing): one holder at a time,
    across processes; the kernel drops it if the holder dies."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
