"""The one Maven fetch: ``mvn`` copies artifacts from Maven Central into a directory of the
cache, once, under a file lock, through a staging directory.

The broker's jars (``dependency:copy-dependencies`` on its pom) and S3Proxy's jar
(``dependency:copy`` of one artifact) are both fetched here. The cache is shared between
homes and test sessions, so a lock beside the directory lets one copier run at a time;
Maven writes into a fresh staging directory beside it, and only a complete copy, its
marker written, is renamed into place. An interrupted download therefore leaves no half
directory behind, and a changed ``stamp`` (a new pom) means a fresh copy.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lorastream.dev.errors import BrokerError
from lorastream.dev.files import locked, read_stripped

__all__ = ["MARKER", "MavenFailed", "fetch"]

MARKER = ".complete"
"""The file in a fetched directory that holds its stamp, written last."""


class MavenFailed(BrokerError):
    """Maven exited non-zero, or copied nothing that matched; the caller words the message."""

    def __init__(self, returncode: int, output: str) -> None:
        super().__init__(f"mvn exited {returncode}")
        self.returncode = returncode
        self.output = output


def fetch(
    dest: Path,
    goal: Sequence[str],
    *,
    stamp: str,
    expect: str,
    what: str,
    pom: Path | None = None,
    log: Path | None = None,
    timeout: float | None = None,
) -> Path:
    """``dest`` holding what ``mvn -B -ntp [-f POM] GOAL -DoutputDirectory=...`` copies.

    Nothing runs when ``dest/.complete`` already says ``stamp``. Otherwise, under the lock
    ``.<dest name>.lock`` beside ``dest``, Maven copies into a staging directory (with its
    own copy of ``pom``, so it never writes into the package); the copy must hold a file
    matching the glob ``expect``. Maven's output goes to ``log`` when given. Raises
    :class:`BrokerError` ``cannot <what>: Maven (mvn) is not on PATH``, and
    :class:`MavenFailed` when Maven fails. A process that still uses the old files keeps
    them open after the swap (Linux unlink semantics).
    """
    if read_stripped(dest / MARKER) == stamp:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with locked(dest.parent / f".{dest.name}.lock"):
        if read_stripped(dest / MARKER) == stamp:
            return dest
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError(f"cannot {what}: Maven (mvn) is not on PATH")
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            copied = staging / "libs"
            project: list[str] = []
            if pom is not None:
                shutil.copy(pom, staging / "pom.xml")
                project = ["-f", str(staging / "pom.xml")]
            cmd = [mvn, "-B", "-ntp", *project, *goal, f"-DoutputDirectory={copied}"]
            # In the empty staging directory, so that no pom.xml of the caller's cwd is used.
            done = subprocess.run(
                cmd, capture_output=True, text=True, check=False, cwd=staging, timeout=timeout
            )
            output = done.stdout + done.stderr
            if log is not None:
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text(output)
            if done.returncode != 0 or not any(copied.glob(expect)):
                raise MavenFailed(done.returncode, output)
            (copied / MARKER).write_text(stamp)
            if dest.exists():
                dest.rename(staging / "old")
            copied.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest
