"""A broker that goes away under running stages (#22, finding 9): Ctrl-C on ``score`` took
about a minute and filled its log with a traceback printed one token per line; ``train``
ended in a traceback.

A broker of its own, on free ports in a temporary home (the jar cache is shared), is
stopped under a running ``score`` and ``train``; the shared broker is left alone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorastream.dev.broker import LocalBroker
from lorastream.dev.ports import free_port
from lorastream.dev.process import signal_group
from lorastream.dev.workers import LORASTREAM, Worker, worker_env
from lorastream.settings import default_home
from schemas import Topics
from tests.kafka_util import read_all, start_test_broker, wait_for

pytestmark = pytest.mark.integration

STOP_WITHIN = 10.0  # seconds from the signal to the exit (#22)

# What a log line says after its prefix: Faust's "[time] [pid] [LEVEL] " or ours
# "date time LEVEL logger: ".
_PREFIX = re.compile(r"^(\[[^]]*\] \[\d+\] \[\w+\] |\d{4}-\d\d-\d\d [\d:,]+ \w+ [\w.]+: )")


# Faust's spinner: cursor off and on, backspaces.
_TERMINAL = re.compile(r"\x1b\[\?25[lh]|[\x00-\x08]")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    local = LocalBroker(
        tmp_path_factory.mktemp("broker-gone"),
        port=free_port(),
        controller_port=free_port(),
        heap="512m",
        jars_dir=default_home() / "jars",
    )
    start_test_broker(local)
    try:
        yield local
    finally:
        local.stop()


def longest_run_of_one_word_lines(text: str) -> int:
    """How many consecutive log lines say one word at most: a traceback logged a
    ``write()`` at a time reads ``^``, ``^``, ``^``..."""
    longest = run = 0
    for line in text.splitlines():
        said = _PREFIX.sub("", line.strip())
        run = run + 1 if said and len(said.split()) <= 1 else 0
        longest = max(longest, run)
    return longest


def _lines_said(log: str) -> list[str]:
    """The log's lines past the ones every run starts with (what score prints first, and
    the terminal codes Faust's spinner writes)."""
    lines = [_TERMINAL.sub("", line).strip() for line in log.splitlines()]
    return [line for line in lines if line and not line.startswith("scoring ")]


def test_the_one_word_run_is_what_finding_9_showed() -> None:
    shown = "\n".join(
        ["[2026-12-07 21:03:07,793] [8422] [WARNING] Traceback (most recent call last): "]
        + ["[2026-12-07 21:03:07,794] [8422] [WARNING] ^ "] * 6
    )
    assert longest_run_of_one_word_lines(shown) == 6
    normal = "2026-12-07 21:06:52,378 ERROR aiokafka: Unable to update metadata from [1]\n" * 9
    assert longest_run_of_one_word_lines(normal) == 0


def _exit_after(worker: Worker, signum: int) -> int | None:
    """Send ``signum`` to the worker; its exit status, or None when it was still running
    :data:`STOP_WITHIN` s later (it is then killed)."""
    assert worker.proc is not None
    signal_group(worker.proc, signum)
    try:
        status: int | None = worker.proc.wait(timeout=STOP_WITHIN)
    except subprocess.TimeoutExpired:
        status = None
        worker.kill()
    return status


async def test_stages_stop_at_once_on_a_signal_while_the_broker_is_down(
    broker: LocalBroker, tmp_path: Path
) -> None:
    prefix = f"g{uuid.uuid4().hex[:10]}."
    env = worker_env(
        broker.bootstrap,
        prefix,
        tmp_path / "home",
        LORASTREAM_ADAPTER_DIR=str(tmp_path / "adapters"),
    )
    created = subprocess.run(
        [LORASTREAM, "topics", "create", "--partitions", "1"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    results = tmp_path / "results.jsonl"
    results.write_text(
        '{"id": "r0", "adapter": "tutor", "prompt": "q", "response": "an answer", '
        '"entropy_delta": 0.5}\n'
    )
    topics = Topics.named(prefix)
    workers = {
        "score SIGINT": (Worker(["score"], env, tmp_path / "score-int.log"), signal.SIGINT),
        "score SIGTERM": (Worker(["score"], env, tmp_path / "score-term.log"), signal.SIGTERM),
        "train SIGINT": (Worker(["train"], env, tmp_path / "train.log"), signal.SIGINT),
    }
    for worker, _ in workers.values():
        worker.start()
    try:
        produced = subprocess.run(
            [LORASTREAM, "produce", str(results)],
            env={**os.environ, **env},
            capture_output=True,
            timeout=60,
        )
        assert produced.returncode == 0, produced.stderr
        # Scored: a scorer has joined and runs (the other may be idle, one partition).
        scored = await read_all(broker.bootstrap, topics.learning_events, 1, timeout=90)
        assert len(scored) == 1, [w.output() for w, _ in workers.values()]
        train = workers["train SIGINT"][0]
        # Its lineages read (fresh topics: it writes the snapshots): it is running. A stop
        # during that read waits for the stop deadline (a StopTimeout line at the deadline).
        await wait_for(train.said("wrote the snapshots"), 90, "the trainer running")
        broker.stop()
        for name, (worker, _) in workers.items():
            await wait_for(worker.said("Unable connect"), 60, f"{name} retrying")
        for name, (worker, signum) in workers.items():
            assert worker.alive(), (name, worker.output())
            status = _exit_after(worker, signum)
            log = worker.output()
            assert status is not None, f"{name} still running {STOP_WITHIN} s later:\n{log}"
            assert "Traceback" not in log, (name, log)
            assert longest_run_of_one_word_lines(log) < 5, (name, log)
            # Besides log records, one line at most: the deadline's, if it had to cut in.
            said = [line for line in _lines_said(log) if not _PREFIX.match(line)]
            assert len(said) <= 1 and all("StopTimeout" in line for line in said), (name, log)
    finally:
        for worker, _ in workers.values():
            worker.kill()
