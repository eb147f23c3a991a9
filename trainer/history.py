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

from schemas import AdapterUpdate, LearningEvent, SchemaError, decode
from schemas.limits import clip
from trainer.exceptions import TrainerError
from trainer.kafka import kafka_errors, reader
from trainer.lineage import Lineage, apply_records, read_announcement
from trainer.signing import WRITER_HEADER, Verifier, header
from trainer.snapshot import (
    COMPLETE,
    LineageSnapshot,
    UnreadableSnapshot,
    lineage_of,
    read_completion,
    read_snapshot,
)
from trainer.window import held_out

log = logging.getLogger(__name__)

__all__ = [
    "Bound",
    "LineageLog",
    "PartitionRange",
    "first_keyed",
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
    needs. The snapshots are a cache of ``adapter-updates``, never trusted over it:
    when that topic is not complete (a pipeline from before it), when the newest
    record of its completion or of any adapter is unreadable (a tombstone, garbage, a
    record that fails verification), or when the history read after the snapshots
    does not continue them, every lineage is read from the history in full and
    :attr:`needs_snapshots` says so (the trainer then writes them again). An adapter
    with no snapshot is checked against the history before its first version, so no
    version that ``adapter-updates`` holds is announced again.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        updates_topic: str,
        quarantine_topic: str | None = None,
        client_options: dict[str, Any] | None = None,
        latest_topic: str | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        # What is trusted of adapter-updates and its snapshots (trainer.signing).
        self.verifier = verifier or Verifier()
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
        # Who wrote each adapter's announcements and quarantine records: the writer header
        # (trainer.signing) of each, None for a record without one (written before it).
        self.writers: dict[str, set[str | None]] = {}
        self._reached: dict[str, dict[TopicPartition, int]] = {}
        # Where the lineages came from: None before the first refresh; "history" once read
        # in full (every later version comes with the tail); "snapshots" from the snapshot
        # topic (an adapter that has none there is then checked against the history).
        self._source: str | None = None
        self._tail_checked = False
        # The readable snapshots found at the start (held up against the history if it is
        # read in full), and where the unreadable ones lie, per key.
        self._snapshots: dict[str, LineageSnapshot] = {}
        self._unreadable_keys: dict[str, tuple[int, int]] = {}

    @property
    def stray(self) -> list[tuple[int, int]]:
        """The positions (partition, offset) of unreadable snapshot records under keys that
        are no adapter's with a version: what a completion names (there is no snapshot to
        write over them), so that they do not make every start read the history again."""
        return sorted(
            position
            for key, position in self._unreadable_keys.items()
            if (lineage := self.lineages.get(key)) is None or lineage.latest is None
        )

    async def refresh(self) -> dict[str, Lineage]:
        """Apply what was committed since the last refresh; return the lineages."""
        if self._source is None:
            self._source = "history"
            if self.latest_topic is not None:
                doubt = await self._from_snapshots(self.latest_topic)
                if doubt is None:
                    self._source = "snapshots"
                else:
                    log.log(
                        # A pipeline new, or from before the topic, has no completion yet.
                        logging.INFO if doubt == _NOT_COMPLETE else logging.WARNING,
                        "the snapshots on %s cannot be trusted (%s): reading every lineage "
                        "from %s in full, then writing the snapshots again",
                        self.latest_topic,
                        clip(doubt, 600),
                        self.updates_topic,
                    )
                    self.needs_snapshots = True
        elif self._source == "snapshots":
            unknown = sorted(a for a, lineage in self.lineages.items() if lineage.is_empty)
            if unknown:
                # No snapshot says whether adapter-updates holds versions of these (a snapshot
                # the cleaner dropped after its tombstone, say): the history does.
                log.info(
                    "%s: no snapshot on %s; reading %s in full before a first version",
                    ", ".join(unknown),
                    self.latest_topic,
                    self.updates_topic,
                )
                await self._rebuild(unknown)
                return self.lineages
        updates = await self._read(self.updates_topic)
        quarantined = await self._read(self.quarantine_topic) if self.quarantine_topic else []
        if self._source == "snapshots" and not self._tail_checked:
            self._tail_checked = True
            doubt = _tail_doubt(self._snapshots, updates, self.verifier)
            if doubt is not None:
                log.warning(
                    "the snapshots on %s disagree with %s (%s): reading every lineage from "
                    "%s in full, then writing the snapshots again",
                    self.latest_topic,
                    self.updates_topic,
                    clip(doubt, 600),
                    self.updates_topic,
                )
                self.needs_snapshots = True
                await self._rebuild()
                return self.lineages
        apply_records(self.lineages, updates, quarantined, self.unreadable, self.verifier)
        self._report_disagreements()
        return self.lineages

    async def _from_snapshots(self, topic: str) -> str | None:
        """Start from the snapshots, and read the history only from where it ended before
        they were read: a version committed meanwhile is in both, and applied once.
        Return why the snapshots are not trusted, or None.

        Only what compaction leaves counts: the NEWEST record of each key. The topic is
        trusted only when its newest :data:`COMPLETE` record (written with every adapter's
        snapshot in one transaction) and every key's newest record are readable
        (:func:`~trainer.snapshot.read_snapshot`); an unreadable record that the completion
        names (under a key that is no adapter's) is known, and does not count."""
        ends = await committed_ends(self.bootstrap_servers, self.updates_topic, self.client_options)
        records, _ = await read_committed_topic(self.bootstrap_servers, topic, self.client_options)
        newest: dict[bytes | None, ConsumerRecord[bytes, bytes]] = {}
        for record in records:  # in offset order per partition: the last one stands
            newest[record.key] = record
        doubts: list[str] = []
        known: set[tuple[int, int]] = set()
        marker = newest.pop(COMPLETE.encode(), None)
        if marker is None:
            doubts.append(_NOT_COMPLETE)
        else:
            try:
                known = set(read_completion(marker, self.verifier).unreadable)
            except UnreadableSnapshot as exc:
                doubts.append(f"the completion record at {_at(marker)} is {exc}")
        for key, record in newest.items():
            name = key.decode(errors="replace") if key is not None else "(no key)"
            try:
                snapshot = read_snapshot(record, self.verifier)
            except UnreadableSnapshot as exc:
                self._unreadable_keys[name] = (record.partition, record.offset)
                if (record.partition, record.offset) not in known:
                    doubts.append(f"the newest snapshot of {name}, at {_at(record)}, is {exc}")
                continue
            self._snapshots[snapshot.adapter] = snapshot
        if doubts:
            return "; ".join(doubts)
        self.lineages.update({a: lineage_of(s) for a, s in self._snapshots.items()})
        self._reached[self.updates_topic] = ends
        return None

    async def _rebuild(self, unknown: list[str] | None = None) -> None:
        """Every lineage again from the whole history (and quarantine): adapter-updates is
        the source of truth, and what disagrees with it is said in one line."""
        empty = [a for a, lineage in self.lineages.items() if lineage.is_empty]
        self.lineages.clear()
        self._reached.pop(self.updates_topic, None)
        if self.quarantine_topic is not None:
            self._reached.pop(self.quarantine_topic, None)
        self._source = "history"
        updates = await self._read(self.updates_topic)
        quarantined = await self._read(self.quarantine_topic) if self.quarantine_topic else []
        apply_records(self.lineages, updates, quarantined, self.unreadable, self.verifier)
        missing = [a for a in unknown or () if a in self.lineages and self.lineages[a].version]
        if missing:
            self.needs_snapshots = True
        self._report_disagreements(missing)
        for adapter in empty:
            self.lineages.setdefault(adapter, Lineage(adapter))

    def _report_disagreements(self, missing: list[str] | None = None) -> None:
        """Once the history is read in full: where the snapshots read at the start (or their
        absence, ``missing``) disagree with it, one line; adapter-updates wins."""
        if self._source != "history" or not (self._snapshots or missing):
            return
        differ = [
            f"{a}: no snapshot, adapter-updates v{self.lineages[a].version}" for a in missing or ()
        ]
        for adapter, snapshot in sorted(self._snapshots.items()):
            said = snapshot.update
            lineage = self.lineages.get(adapter)
            holds = lineage.version if lineage is not None else 0
            if lineage is None or holds < said.version:
                differ.append(f"{adapter}: snapshot v{said.version}, adapter-updates v{holds}")
                continue
            first = lineage.updates[0].version
            if said.version >= first:
                theirs = lineage.updates[said.version - first]
                if theirs.sha256 != said.sha256:
                    differ.append(
                        f"{adapter} v{said.version}: snapshot sha256 {said.sha256[:12]}…, "
                        f"adapter-updates {theirs.sha256[:12]}…"
                    )
        self._snapshots = {}
        if differ:
            self.needs_snapshots = True
            log.warning(
                "adapter-updates and the snapshots on %s disagree; adapter-updates wins: %s",
                self.latest_topic,
                clip("; ".join(differ), 600),
            )

    async def _read(self, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
        records, reached = await read_committed_topic(
            self.bootstrap_servers, topic, self.client_options, self._reached.get(topic)
        )
        self._reached[topic] = reached
        if topic in (self.updates_topic, self.quarantine_topic):
            for record in records:
                if record.key is not None:
                    writer = header(record, WRITER_HEADER)
                    self.writers.setdefault(record.key.decode(errors="replace"), set()).add(
                        writer.decode(errors="replace") if writer is not None else None
                    )
        return records


_NOT_COMPLETE = "no completion record"


def _at(record: ConsumerRecord[bytes, bytes]) -> str:
    return f"{record.topic}[{record.partition}]@{record.offset}"


def _tail_doubt(
    snapshots: dict[str, LineageSnapshot],
    updates: list[ConsumerRecord[bytes, bytes]],
    verifier: Verifier,
) -> str | None:
    """Why the announcements committed since the snapshots' read (``updates``) do not
    continue them, or None.

    Every version of an adapter committed after that read began is in ``updates``; the
    snapshot's own version too if any older one is. So an adapter's versions there start
    at its snapshot's next version, or include the snapshot's version, with its sha256."""
    found: dict[str, list[AdapterUpdate]] = {}
    for record in sorted(updates, key=lambda r: (r.partition, r.offset)):
        update = read_announcement(record, verifier)
        if update is not None:
            found.setdefault(update.adapter, []).append(update)
    doubts = []
    for adapter, tail in sorted(found.items()):
        snapshot = snapshots.get(adapter)
        said = snapshot.update.version if snapshot is not None else 0
        first = min(u.version for u in tail)
        same = [u for u in tail if u.version == said]
        if first > said + 1:
            doubts.append(f"{adapter}: snapshot v{said}, adapter-updates continues at v{first}")
        elif first <= said and not same:
            doubts.append(f"{adapter}: snapshot v{said}, adapter-updates has no v{said}")
        elif snapshot is not None and same and same[0].sha256 != snapshot.update.sha256:
            doubts.append(f"{adapter} v{said}: the snapshot's sha256 is not adapter-updates'")
    return "; ".join(doubts) or None


async def first_keyed(
    bootstrap_servers: str,
    topic: str,
    key: str,
    client_options: dict[str, Any] | None = None,
) -> ConsumerRecord[bytes, bytes] | None:
    """The first committed record of ``topic`` keyed ``key``, or None.

    Only the partition that the producers' default partitioner (murmur2 of the key, as
    aiokafka and the Java client compute it) puts ``key`` on is read, up to its end now;
    the read stops at the first match."""
    from aiokafka.partitioner import murmur2

    wanted = key.encode()
    async with reader(bootstrap_servers, f"reading {topic}", client_options) as consumer:
        tps = await topic_partitions(consumer, topic, bootstrap_servers)
        tp = tps[(murmur2(wanted) & 0x7FFFFFFF) % len(tps)]
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        async for batch in _drain(consumer, {tp: end}):
            for record in batch:
                if record.key == wanted:
                    return record
        return None


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
    verifier: Verifier | None = None,
) -> dict[str, Lineage]:
    """Every adapter's lineage from the committed announcements (and quarantine records)
    that ``verifier`` trusts."""
    return await LineageLog(
        bootstrap_servers, updates_topic, quarantine_topic, client_options, verifier=verifier
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
