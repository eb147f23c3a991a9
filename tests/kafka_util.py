"""Small helpers for tests against the real broker: read a topic back, wait for a
condition, and what a command said.

Topics, producing and worker processes are shared with the benchmarks and the soak:
:mod:`lorastream.dev.topics` and :mod:`lorastream.dev.workers`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from trainer.committed import drain, topic_partitions
from trainer.exceptions import TrainerError
from trainer.kafka import KafkaConnection, reader

if TYPE_CHECKING:
    from lorastream.dev.broker import LocalBroker


async def read_all(
    bootstrap: str,
    topic: str,
    expect: int,
    timeout: float = 60.0,
    settle: float = 0.0,
    isolation_level: str = "read_committed",
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from the beginning, partition by partition in offset order.

    It reads to the partitions' end offsets as this reader sees them now (read_committed:
    the last stable offsets, so every committed record and nothing of an open
    transaction), and again to the new ends until it holds at least ``expect`` records
    or ``timeout`` s have passed; then it returns, with no fixed wait. Records past
    ``expect`` that were there are returned too. A caller that wants records written
    *after* the first ``expect`` (a duplicate a worker might still write) passes
    ``settle``: the reader waits that long once it has them, and reads to the ends again.

    An open transaction (a worker paused or killed inside one) holds the end back; unlike
    ``trainer.committed.read_committed_topic``, this reader does not wait for it to end.
    """
    async with reader(
        KafkaConnection(bootstrap), f"reading {topic}", isolation_level=isolation_level
    ) as consumer:
        tps = await _partitions(consumer, topic, bootstrap)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord[bytes, bytes]] = []
        try:
            async with asyncio.timeout(timeout):
                await _read_to_ends(consumer, tps, records)
                while len(records) < expect:
                    await asyncio.sleep(0.2)
                    await _read_to_ends(consumer, tps, records)
            if settle > 0:
                await asyncio.sleep(settle)
                async with asyncio.timeout(timeout):
                    await _read_to_ends(consumer, tps, records)
        except TimeoutError:
            pass  # fewer than expect: the caller's assertion says what is missing
        return sorted(records, key=lambda r: (r.partition, r.offset))


async def _partitions(
    consumer: AIOKafkaConsumer, topic: str, bootstrap: str
) -> list[TopicPartition]:
    """The partitions of ``topic``, asked again for up to 15 s: a topic just created may
    not be in the broker's metadata yet."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return await topic_partitions(consumer, topic, bootstrap)
        except TrainerError:  # the topic is not there (yet)
            if time.monotonic() >= deadline:
                raise AssertionError(f"topic {topic} does not exist") from None
            await asyncio.sleep(0.2)


async def _read_to_ends(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    records: list[ConsumerRecord[bytes, bytes]],
) -> None:
    """Append to ``records`` every record from the reader's positions to the partitions'
    end offsets as of now, and leave each position at its end: a fetch may bring records
    past an end (committed since), and the next read starts there, not after them."""
    ends = await consumer.end_offsets(tps)
    async for batch in drain(consumer, ends):
        records.extend(batch)
    for tp in tps:
        consumer.seek(tp, ends[tp])


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


def start_test_broker(broker: LocalBroker, timeout: float = 120.0) -> None:
    """Start, or start again, a test's own broker; one that died while starting is
    started once more.

    Such a death is the machine's, not the code under test's: ports from
    :func:`~lorastream.dev.ports.free_port` are ephemeral ones, and in the seconds before
    the JVM binds them a client connection of another test may take one as its local
    port; or the broker was killed (its log just stops; CI saw it about once in three
    runs, on a first start and on a restart alike). The first error, with the machine's
    free memory and load then, goes to stderr (the test's captured output), so that a
    second look at a failure finds it.
    """
    from lorastream.dev.broker import BrokerError
    from lorastream.dev.ports import free_port

    try:
        broker.start(timeout=timeout)
    except BrokerError as first:
        if "exited while starting" not in str(first):
            raise
        print(
            f"the test broker died while starting ({_machine_now()}); once more:\n{first}",
            file=sys.stderr,
        )
        if "Address already in use" in str(first):
            broker.port, broker.controller_port = free_port(), free_port()
        broker.start(timeout=timeout)


def _machine_now() -> str:
    """Free memory and load, for the line that says a test's broker died."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        load = Path("/proc/loadavg").read_text().split()[:3]
    except (OSError, ValueError):
        return "memory and load unknown"
    available = int(info["MemAvailable"].split()[0]) // 1024
    return f"{available} MiB available, load {' '.join(load)}"
