"""Small helpers for tests against the real broker: topics, produce, read back, workers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord, RecordMetadata

from lorastream.ops.admin import create_topics, topic_specs
from schemas import Topics

LORASTREAM = str(Path(sys.executable).with_name("lorastream"))


async def make_topics(bootstrap: str, prefix: str, partitions: int = 1) -> Topics:
    topics = Topics.named(prefix)
    await create_topics(bootstrap, topic_specs(topics, partitions, 1))
    return topics


async def produce(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes | None]]
) -> list[RecordMetadata]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v) for k, v in records]
        return [await f for f in futures]
    finally:
        await producer.stop()


async def read_all(
    bootstrap: str,
    topic: str,
    expect: int,
    timeout: float = 60.0,
    settle: float = 1.5,
    isolation_level: str = "read_committed",
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from the beginning: at least ``expect`` of them, waiting up to
    ``timeout``; then ``settle`` seconds more, so that records beyond ``expect`` are seen too."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation_level
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        deadline = time.monotonic() + 15
        while not partitions and time.monotonic() < deadline:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        assert partitions, f"topic {topic} does not exist"
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while True:
            now = time.monotonic()
            if len(records) >= expect and settle_until is None:
                settle_until = now + settle
            if settle_until is not None and now >= settle_until:
                break
            if now >= deadline:
                break
            batch = await consumer.getmany(timeout_ms=200)
            for part in batch.values():
                records.extend(part)
        return records
    finally:
        await consumer.stop()


class Worker:
    """A ``lorastream`` command run as a real process, its output kept in a log file."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.args = list(args)
        self.env = {**os.environ, **env}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        handle = self.log.open("ab")
        self.proc = subprocess.Popen(
            [LORASTREAM, *self.args],
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int | None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def said(self, text: str) -> Any:
        """A predicate for :func:`wait_for`: has the worker written ``text`` yet?"""

        async def check() -> bool:
            return text in self.output()

        return check

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.terminate()


def worker_env(bootstrap: str, prefix: str, home: Path, **more: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "LORASTREAM_TOPIC_PREFIX": prefix,
        "LORASTREAM_HOME": str(home),
        # Tests that count windows and check lineages train every event; held-out
        # evaluation is tested on its own (tests/trainer/test_eval.py).
        "LORASTREAM_EVAL_FRACTION": "0",
        **more,
    }


async def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Ran:
    """A ``lorastream`` command run as a user runs it: what it said, and how long it took."""

    command: Sequence[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def __str__(self) -> str:
        return (
            f"lorastream {' '.join(self.command)} → {self.returncode} in {self.seconds:.1f}s\n"
            f"stdout: {self.stdout}\nstderr: {self.stderr}"
        )
