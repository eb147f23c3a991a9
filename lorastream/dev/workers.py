"""``lorastream`` commands run as real processes, as the tests, the benchmarks and the soak
run the scorer and the trainer: one process group each, output kept in a log file.

It serves the tests, ``bench/`` and the soak; the product never imports it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from subprocess import Popen
from typing import Any

from lorastream.dev.process import kill_group, start_group, stop_group

__all__ = ["LORASTREAM", "Worker", "worker_env"]

LORASTREAM = str(Path(sys.executable).with_name("lorastream"))
"""The ``lorastream`` script of the environment that runs this Python."""


class Worker:
    """A ``lorastream`` command run as a real process, its output kept in a log file."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.args = list(args)
        self.env = {**os.environ, **env}
        self.log = log
        self.proc: Popen[bytes] | None = None

    def start(self) -> Worker:
        self.proc = start_group([LORASTREAM, *self.args], log=self.log, env=self.env)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.proc and self.proc.poll() is None:
            kill_group(self.proc)

    def terminate(self, timeout: float = 30) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; the exit status."""
        return stop_group(self.proc, timeout) if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def said(self, text: str) -> Callable[[], Awaitable[bool]]:
        """A predicate for ``wait_for``: has the worker written ``text`` yet?"""

        async def check() -> bool:
            return text in self.output()

        return check

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.terminate()


def worker_env(bootstrap: str, prefix: str, home: Path, **more: str) -> dict[str, str]:
    """The environment of a worker on ``bootstrap`` with topics under ``prefix``."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "LORASTREAM_TOPIC_PREFIX": prefix,
        "LORASTREAM_HOME": str(home),
        # Tests that count windows and check lineages train every event; held-out
        # evaluation is tested on its own (tests/trainer/test_eval.py).
        "LORASTREAM_EVAL_FRACTION": "0",
        **more,
    }
