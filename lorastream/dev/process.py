"""The one way a local service or worker runs as a process of its own: a new session (its
own process group), so that Ctrl-C in the terminal that started it does not reach it and a
stop reaches every process it started (a JVM, a Faust worker's children).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def start_group(
    argv: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, stdout and stderr appended to ``log``, no stdin."""
    with log.open("ab") as handle:
        return subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def signal_group(proc: subprocess.Popen[bytes], signum: int) -> bool:
    """Send ``signum`` to the process group of ``proc`` (pgid == pid: it leads its session);
    False if it had already exited."""
    if proc.poll() is not None:
        return False
    return signal_pgid(proc.pid, signum)


def signal_pgid(pgid: int, signum: int) -> bool:
    """Send ``signum`` to the process group ``pgid``: for a session leader that this process
    knows by its pid only (the broker's pid file); False if no such group is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)
        return True
    return False


def kill_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGKILL the whole group, as in a crash: no shutdown code runs. Its exit status."""
    signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    return proc.returncode


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int | None:
    """SIGTERM the group and wait up to ``timeout`` s for a clean exit, then SIGKILL it.
    The exit status (None only if even SIGKILL did not end it within 10 s)."""
    if signal_group(proc, signal.SIGTERM):
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return kill_group(proc)
    return proc.returncode


async def run_group(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float
) -> tuple[int | None, bytes, bytes]:
    """Run ``argv`` in a new session with stdout and stderr captured, as an operator runs a
    command; past ``timeout`` s its whole group is SIGKILLed. Its exit status (None when it
    timed out, then with empty output), stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=None if env is None else dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        return proc.returncode, out, err
    except TimeoutError:
        return None, b"", b""
    finally:
        if proc.returncode is None:
            signal_pgid(proc.pid, signal.SIGKILL)
            await proc.wait()
