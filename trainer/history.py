"""Reading history back from Kafka: lineages, and offset or time ranges of a topic.

Everything here reads committed records only (``read_committed``) through a
group-less consumer, so nothing it does moves any group's offsets. The
lineage of every adapter is rebuilt from ``adapter-updates`` and the
quarantine topic (:func:`load_lineages`); a replay reads a range of a topic
partition by partition, in offset order (:func:`resolve_range`,
:func:`read_range`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas import LearningEvent, SchemaError, decode
from trainer.exceptions import TrainerError
from trainer.kafka import kafka_errors, reader
from trainer.lineage import Lineage, apply_records
from trainer.snapshot import COMPLETE, LineageSnapshot, lineage_of
from trainer.window import held_out

log = logging.getLogger(__name__)

__all__ = [
    "Bound",
    "LineageLog",
    "PartitionRange",
    "load_lineages",
    "read_committed_topic",
    "read_range",
    "resolve_range",
    "topic_partitions",
]

Bound = int | datetime
"""One end of a range: an offset, or a time (the record timestamps of the topic)."""


async def topic_partitions(
    consumer: AIOKafkaConsumer, topic: str, bootstrap_servers: str
) -> list[TopicPartition]:
    """The partitions of ``topic``; a started consumer knows no topic until it asks for one."""
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        consumer._client.add_topic(topic)
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise TrainerError(
            f"topic {topic} does not exist on {bootstrap_servers}; run `lorastream topics create`"
        )
    return [TopicPartition(topic, p) for p in sorted(partitions)]


async def _drain(
    consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int], max_records: int = 2000
) -> AsyncIterator[list[ConsumerRecord[bytes, bytes]]]:
    """Batches of records until every partition's position reaches its end (exclusive)."""
    remaining = {tp for tp, end in ends.items() if await consumer.position(tp) < end}
    while remaining:
        batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=max_records)
        for tp, records in batch.items():
            kept = [r for r in records if r.offset < ends[tp]]
            if kept:
                yield kept
        for tp in list(remaining):
            if await consumer.position(tp) >= ends[tp]:
                remaining.discard(tp)


async def _settled_ends(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    bootstrap_servers: str,
    client_options: dict[str, Any] | None,
) -> dict[TopicPartition, int]:
    """The read_committed end of each partition once every transaction open now has ended.

    A read_committed reader stops at the last stable offset (LSO): the first
    record of the oldest open transaction. A trainer killed inside its
    transaction holds the LSO back until the broker aborts it (its
    transaction timeout), and every version committed after that point stays
    invisible: a lineage read then would be stale, and the trainer would
    announce those versions again. So the reader waits until the LSO reaches
    the high watermark as it is now; transactions begun later cannot hold a
    version it needs (a partition's versions come from its one owner).
    """
    async with reader(
        bootstrap_servers,
        f"reading {tps[0].topic}",
        client_options,
        isolation_level="read_uncommitted",
    ) as plain:
        highwater = await plain.end_offsets(tps)
    started = time.monotonic()
    said = 0.0
    while True:
        stable = await consumer.end_offsets(tps)
        behind = {tp: (stable[tp], highwater[tp]) for tp in tps if stable[tp] < highwater[tp]}
        if not behind:
            return stable
        waited = time.monotonic() - started
        if waited - said >= 10 or (not said and waited >= 1):
            said = waited
            log.warning(
                "waiting for open transactions on %s to end (a writer that died inside one "
                "is aborted by the broker after its transaction timeout): %s",
                tps[0].topic,
                ", ".join(
                    f"[{tp.partition}] stable {lo} < {hi}" for tp, (lo, hi) in behind.items()
                ),
            )
        await asyncio.sleep(0.2)


async def read_committed_topic(
    bootstrap_servers: str,
    topic: str,
    client_options: dict[str, Any] | None = None,
    since: dict[TopicPartition, int] | None = None,
) -> tuple[list[ConsumerRecord[bytes, bytes]], dict[TopicPartition, int]]:
    """The committed records of ``topic`` as of now (from ``since``, else the beginning),
    partition by partition in offset order, and the position reached in each partition.

    "As of now" includes every transaction that is open now: the read waits until
    they have ended (see :func:`_settled_ends`).
    """
    async with reader(bootstrap_servers, f"reading {topic}", client_options) as consumer:
        tps = await topic_partitions(consumer, topic, bootstrap_servers)
        ends = await _settled_ends(consumer, tps, bootstrap_servers, client_options)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*[tp for tp in tps if tp not in (since or {})])
        for tp, offset in (since or {}).items():
            if tp in tps:
                consumer.seek(tp, offset)
        records: list[ConsumerRecord[bytes, bytes]] = []
        async for batch in _drain(consumer, ends):
            records.extend(batch)
        reached = {tp: max(ends[tp], (since or {}).get(tp, 0)) for tp in tps}
        return sorted(records, key=lambda r: (r.partition, r.offset)), reached


class LineageLog:
    """Every adapter's lineage, kept current by reading only what was committed since.

    ``adapter-updates`` and the quarantine topic are append-only, so the
    lineages after :meth:`refresh` are those a full read would give, at the
    cost of the records committed since the previous refresh. Records this
    process committed itself (and already applied) are recognised and skipped.

    With ``latest_topic`` (the compacted snapshots, :mod:`trainer.snapshot`), the
    first refresh reads one snapshot per adapter instead of the whole history: the
    lineages then hold each adapter's newest version only, which is all a trainer
    needs. If that topic is empty while the history is not (a pipeline from before
    it), the history is read in full and :attr:`needs_snapshots` says so.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        updates_topic: str,
        quarantine_topic: str | None = None,
        client_options: dict[str, Any] | None = None,
        latest_topic: str | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.updates_topic = updates_topic
        self.quarantine_topic = quarantine_topic
        self.latest_topic = latest_topic
        self.client_options = client_options
        self.lineages: dict[str, Lineage] = {}
        # Per learning-events partition, the last offset quarantined as unreadable: unreadable
        # records are quarantined in offset order, so one at or below it is quarantined
        # already (a rebalance re-reads from a committed offset held back by open windows).
        self.unreadable: dict[TopicPartition, int] = {}
        self.needs_snapshots = False
        self._reached: dict[str, dict[TopicPartition, int]] = {}

    async def refresh(self) -> dict[str, Lineage]:
        """Apply what was committed since the last refresh; return the lineages."""
        if self.latest_topic is not None and self.updates_topic not in self._reached:
            await self._from_snapshots(self.latest_topic)
        updates = await self._read(self.updates_topic)
        quarantined = await self._read(self.quarantine_topic) if self.quarantine_topic else []
        apply_records(self.lineages, updates, quarantined, self.unreadable)
        return self.lineages

    async def _from_snapshots(self, topic: str) -> None:
        """Start from the snapshots, and read the history only from where it ended before
        they were read: a version committed meanwhile is in both, and applied once.

        Only a topic that a trainer has completed (its :data:`COMPLETE` record, written with
        every adapter's snapshot in one transaction) is trusted: until then, the history
        is read in full and :attr:`needs_snapshots` is set."""
        ends = await committed_ends(self.bootstrap_servers, self.updates_topic, self.client_options)
        records, _ = await read_committed_topic(self.bootstrap_servers, topic, self.client_options)
        newest: dict[str, LineageSnapshot] = {}
        complete = False
        for record in records:
            if record.key == COMPLETE.encode():
                complete = True
                continue
            try:
                snapshot = decode(record.value, LineageSnapshot)
            except SchemaError as exc:
                log.warning(
                    "skipping an unreadable snapshot at %s@%s: %s", topic, record.offset, exc
                )
                continue
            known = newest.get(snapshot.adapter)
            if known is None or snapshot.update.version > known.update.version:
                newest[snapshot.adapter] = snapshot
        if not complete:
            self.needs_snapshots = True
            return  # a full read of the history, as before
        self.lineages.update({a: lineage_of(s) for a, s in newest.items()})
        self._reached[self.updates_topic] = ends

    async def _read(self, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
        records, reached = await read_committed_topic(
            self.bootstrap_servers, topic, self.client_options, self._reached.get(topic)
        )
        self._reached[topic] = reached
        return records


async def committed_ends(
    bootstrap_servers: str, topic: str, client_options: dict[str, Any] | None = None
) -> dict[TopicPartition, int]:
    """Where a read_committed reader of ``topic`` ends now, once the transactions open now
    have ended (see :func:`_settled_ends`)."""
    async with reader(bootstrap_servers, f"reading {topic}", client_options) as consumer:
        tps = await topic_partitions(consumer, topic, bootstrap_servers)
        return await _settled_ends(consumer, tps, bootstrap_servers, client_options)


async def load_lineages(
    bootstrap_servers: str,
    updates_topic: str,
    quarantine_topic: str | None = None,
    client_options: dict[str, Any] | None = None,
) -> dict[str, Lineage]:
    """Every adapter's lineage from the committed announcements (and quarantine records)."""
    return await LineageLog(
        bootstrap_servers, updates_topic, quarantine_topic, client_options
    ).refresh()


async def group_offsets(
    bootstrap_servers: str,
    group_id: str,
    topic: str,
    client_options: dict[str, Any] | None = None,
) -> dict[TopicPartition, int]:
    """The offsets ``group_id`` has committed on ``topic`` (none for a group never run).

    On a cluster where no group has ever committed, the first look-up of a coordinator
    makes Kafka create ``__consumer_offsets`` and answers "coordinator not available"
    until it has: that is waited out (up to 15 s), not reported as a failure."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import CoordinatorLoadInProgressError, CoordinatorNotAvailableError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **(client_options or {}))
    deadline = time.monotonic() + 15.0
    try:
        with kafka_errors(bootstrap_servers, f"reading the offsets of group {group_id}"):
            await admin.start()
            while True:
                try:
                    offsets = await admin.list_consumer_group_offsets(group_id)
                    break
                except (CoordinatorNotAvailableError, CoordinatorLoadInProgressError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.25)
    finally:
        await admin.close()
    return {
        tp: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0
    }


async def pending_events(
    bootstrap_servers: str,
    topic: str,
    group_id: str,
    lineages: dict[str, Lineage],
    client_options: dict[str, Any] | None = None,
    eval_fraction: float = 0.0,
) -> dict[str, int]:
    """Per adapter, the learning events that wait for a window: those in open windows and
    those the trainer has not read, less the ones it holds out for evaluation
    (``eval_fraction``, as the trainer's; they never train). Read from the trainer
    group's committed offsets, which never pass an open window's first event."""
    since = await group_offsets(bootstrap_servers, group_id, topic, client_options)
    records, _ = await read_committed_topic(bootstrap_servers, topic, client_options, since)
    counted: dict[str, set[str]] = {}
    for record in records:
        try:
            event = decode(record.value, LearningEvent)
        except SchemaError:
            continue  # quarantined by the trainer, never a window's event
        lineage = lineages.get(event.adapter)
        tp = TopicPartition(record.topic, record.partition)
        if lineage is not None and not lineage.admits(tp, record.offset, event.id):
            continue
        if held_out(event.id, eval_fraction):
            continue
        counted.setdefault(event.adapter, set()).add(event.id)
    return {adapter: len(ids) for adapter, ids in counted.items()}


@dataclass(frozen=True)
class PartitionRange:
    """What to read of one partition: ``[start, end)``, and what the log holds now.

    ``gone`` is the part of the asked-for range that the log no longer
    retains (``[first, last]`` offsets), or None.
    """

    tp: TopicPartition
    start: int
    end: int
    log_start: int
    log_end: int
    gone: tuple[int, int] | None = None

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


def _millis(moment: datetime) -> int:
    return math.floor(moment.timestamp() * 1000)


async def _first_timestamp(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> int:
    consumer.assign([tp])
    consumer.seek(tp, offset)
    record = await consumer.getone(tp)
    return int(record.timestamp)


async def resolve_range(
    bootstrap_servers: str,
    topic: str,
    start: Bound | None = None,
    end: Bound | None = None,
    client_options: dict[str, Any] | None = None,
) -> list[PartitionRange]:
    """Turn ``start``/``end`` (both inclusive; None = the log's ends) into offsets per partition.

    An offset applies to every partition. A time means the first record at
    or after it (``start``) or the last record at or before it (``end``),
    by record timestamp. A range that reaches below what a partition still
    retains says so in :attr:`PartitionRange.gone`.
    """
    async with reader(bootstrap_servers, f"reading {topic}", client_options) as consumer:
        tps = await topic_partitions(consumer, topic, bootstrap_servers)
        firsts = await consumer.beginning_offsets(tps)
        lasts = await consumer.end_offsets(tps)
        at_start = await _offsets_at(consumer, tps, start, lasts)
        at_end = await _offsets_at(consumer, tps, end, lasts, after=True)
        ranges = []
        for tp in tps:
            log_start, log_end = firsts[tp], lasts[tp]
            lo = log_start if start is None else at_start[tp]
            hi = log_end if end is None else min(at_end[tp], log_end)
            gone: tuple[int, int] | None = None
            if isinstance(start, int) and start < log_start:
                gone = (start, log_start - 1)
            elif start is None and log_start > 0:
                gone = (0, log_start - 1)
            elif (
                isinstance(start, datetime)
                and 0 < log_start < log_end
                and lo <= log_start
                and _millis(start) < await _first_timestamp(consumer, tp, log_start)
            ):
                gone = (0, log_start - 1)  # records of the asked-for time were deleted
            ranges.append(PartitionRange(tp, max(lo, log_start), hi, log_start, log_end, gone))
        return ranges


async def _offsets_at(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    bound: Bound | None,
    log_ends: dict[TopicPartition, int],
    after: bool = False,
) -> dict[TopicPartition, int]:
    """Per partition, the offset where ``bound`` starts (or, ``after``, just past where it ends)."""
    if bound is None:
        return {}
    if isinstance(bound, int):
        return {tp: bound + 1 if after else bound for tp in tps}
    millis = _millis(bound) + (1 if after else 0)
    found = await consumer.offsets_for_times({tp: millis for tp in tps})
    return {tp: found[tp].offset if found.get(tp) else log_ends[tp] for tp in tps}


async def read_range(
    bootstrap_servers: str,
    ranges: Sequence[PartitionRange],
    client_options: dict[str, Any] | None = None,
    starts: dict[TopicPartition, int] | None = None,
) -> AsyncGenerator[list[ConsumerRecord[bytes, bytes]], None]:
    """Batches of the committed records in ``ranges``; each partition's in offset order.

    ``starts`` moves a partition's start forward (a resumed replay skips
    what its lineage has handled); it never moves below the range.
    """
    wanted = [r for r in ranges if r.size > 0]
    if not wanted:
        return
    topic = wanted[0].tp.topic
    async with reader(bootstrap_servers, f"reading {topic}", client_options) as consumer:
        consumer.assign([r.tp for r in wanted])
        ends = {}
        for r in wanted:
            consumer.seek(r.tp, max(r.start, (starts or {}).get(r.tp, r.start)))
            ends[r.tp] = r.end
        async for batch in _drain(consumer, ends):
            yield batch
