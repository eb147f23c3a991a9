"""Reading a topic as committed, up to its settled end; and the offsets and lag of topics.

The one reader of a topic's committed records (:func:`read_committed_topic`,
:func:`stream_committed`, :func:`first_keyed`): a group-less ``read_committed``
consumer that reads from the beginning (or given offsets) to the end as it is
now, partition by partition in offset order, and stops. Nothing it does moves
any group's offsets. By default the end is *settled*: every transaction open
when the read begins has ended first (see :func:`_settled_ends`).

The one way to read offsets: the log start and end of partitions, asked of
their leaders (:func:`log_offsets`, :func:`topic_extent`), and what a group
has committed (:func:`group_offsets`), through an admin client that says why a
secured cluster refused it (:func:`trainer.kafka.admin_client`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    CoordinatorLoadInProgressError,
    CoordinatorNotAvailableError,
    LeaderNotAvailableError,
)
from aiokafka.protocol.offset import OffsetRequest
from aiokafka.structs import ConsumerRecord

from trainer.exceptions import TrainerError
from trainer.kafka import (
    KafkaConnection,
    admin_client,
    kafka_errors,
    reader,
    send_to_node,
    track_topics,
)

log = logging.getLogger(__name__)

__all__ = [
    "EARLIEST",
    "LATEST",
    "committed_ends",
    "drain",
    "first_keyed",
    "group_offsets",
    "log_offsets",
    "partition_leaders",
    "read_committed_topic",
    "stream_committed",
    "topic_extent",
    "topic_partitions",
]

EARLIEST, LATEST = -2, -1
"""The ListOffsets "timestamps" that ask for a partition's log start and its end."""


async def topic_partitions(
    consumer: AIOKafkaConsumer, topic: str, servers: str
) -> list[TopicPartition]:
    """The partitions of ``topic``; a started consumer knows no topic until it asks for one."""
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        await track_topics(consumer, [topic])
        partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise TrainerError(
            f"topic {topic} does not exist on {servers}; run `lorastream topics create`"
        )
    return [TopicPartition(topic, p) for p in sorted(partitions)]


async def drain(
    consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int], max_records: int = 2000
) -> AsyncIterator[list[ConsumerRecord[bytes, bytes]]]:
    """Batches of records of the assigned partitions in ``ends``, partition by partition in
    offset order, each up to its end (exclusive).

    Every partition stays assigned, so the consumer fetches the others in the background
    while one is drained."""
    for tp in sorted(ends):
        while await consumer.position(tp) < ends[tp]:
            batch = await consumer.getmany(tp, timeout_ms=500, max_records=max_records)
            kept = [r for r in batch.get(tp, []) if r.offset < ends[tp]]
            if kept:
                yield kept


async def _settled_ends(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    kafka: KafkaConnection,
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
        kafka,
        f"reading {tps[0].topic}",
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


async def _seek(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], since: dict[TopicPartition, int]
) -> None:
    """Assign ``tps``; each starts at ``since``'s offset, else at the beginning."""
    consumer.assign(tps)
    await consumer.seek_to_beginning(*[tp for tp in tps if tp not in since])
    for tp, offset in since.items():
        if tp in tps:
            consumer.seek(tp, offset)


async def read_committed_topic(
    kafka: KafkaConnection,
    topic: str,
    since: dict[TopicPartition, int] | None = None,
) -> tuple[list[ConsumerRecord[bytes, bytes]], dict[TopicPartition, int]]:
    """The committed records of ``topic`` as of now (from ``since``, else the beginning),
    partition by partition in offset order, and the position reached in each partition.

    "As of now" includes every transaction that is open now: the read waits until
    they have ended (see :func:`_settled_ends`).
    """
    since = since or {}
    async with reader(kafka, f"reading {topic}") as consumer:
        tps = await topic_partitions(consumer, topic, kafka.servers)
        ends = await _settled_ends(consumer, tps, kafka)
        await _seek(consumer, tps, since)
        records: list[ConsumerRecord[bytes, bytes]] = []
        async for batch in drain(consumer, ends):
            records.extend(batch)
        reached = {tp: max(ends[tp], since.get(tp, 0)) for tp in tps}
        return records, reached


async def stream_committed(
    kafka: KafkaConnection,
    topic: str,
    *,
    settle: bool = True,
) -> AsyncGenerator[ConsumerRecord[bytes, bytes], None]:
    """The committed records of ``topic`` from the beginning, one at a time, partition by
    partition in offset order, up to the end as of now; then it stops.

    With ``settle`` the end waits for the transactions open now (as
    :func:`read_committed_topic`); without, it is the last stable offset now, and an
    open transaction's records are not waited for (a command that shows what is there).
    A topic that does not exist is the one :class:`~trainer.exceptions.TrainerError` it
    raises.
    """
    async with reader(kafka, f"reading {topic}") as consumer:
        tps = await topic_partitions(consumer, topic, kafka.servers)
        if settle:
            ends = await _settled_ends(consumer, tps, kafka)
        else:
            ends = await consumer.end_offsets(tps)
        await _seek(consumer, tps, {})
        async for batch in drain(consumer, ends):
            for record in batch:
                yield record


async def first_keyed(
    kafka: KafkaConnection,
    topic: str,
    key: str,
) -> ConsumerRecord[bytes, bytes] | None:
    """The first committed record of ``topic`` keyed ``key``, or None.

    Only the partition that the producers' default partitioner (murmur2 of the key, as
    aiokafka and the Java client compute it) puts ``key`` on is read, up to its end now;
    the read stops at the first match."""
    from aiokafka.partitioner import murmur2

    wanted = key.encode()
    async with reader(kafka, f"reading {topic}") as consumer:
        tps = await topic_partitions(consumer, topic, kafka.servers)
        tp = tps[(murmur2(wanted) & 0x7FFFFFFF) % len(tps)]
        end = (await consumer.end_offsets([tp]))[tp]
        await _seek(consumer, [tp], {})
        async for batch in drain(consumer, {tp: end}):
            for record in batch:
                if record.key == wanted:
                    return record
        return None


async def committed_ends(kafka: KafkaConnection, topic: str) -> dict[TopicPartition, int]:
    """Where a read_committed reader of ``topic`` ends now, once the transactions open now
    have ended (see :func:`_settled_ends`)."""
    async with reader(kafka, f"reading {topic}") as consumer:
        tps = await topic_partitions(consumer, topic, kafka.servers)
        return await _settled_ends(consumer, tps, kafka)


# ── offsets and lag ──────────────────────────────────────────────────────────


async def log_offsets(
    admin: AIOKafkaAdminClient,
    leaders: dict[TopicPartition, int],
    timestamp: int,
    *,
    committed: bool = False,
) -> dict[TopicPartition, int]:
    """Each partition's log start (:data:`EARLIEST`) or end (:data:`LATEST`; with
    ``committed``, the end a ``read_committed`` reader sees), asked of its leader
    (``leaders``) in one request per leader. A partition without a leader, or one its
    leader refuses, is left out (no retry).

    One request per leader, not a consumer: a consumer learns each topic's metadata in
    a round trip of its own, which on a cluster of hundreds of topics outlasts its
    request timeout."""
    by_leader: dict[int, dict[str, list[tuple[int, int]]]] = {}
    for tp, leader in leaders.items():
        if leader >= 0:
            topics = by_leader.setdefault(leader, {})
            topics.setdefault(tp.topic, []).append((tp.partition, timestamp))
    found: dict[TopicPartition, int] = {}
    for leader, topics in by_leader.items():
        request = OffsetRequest(-1, 1 if committed else 0, list(topics.items()))
        response = await send_to_node(admin, leader, request)
        for topic, parts in response.topics:
            for partition, error_code, *info in parts:
                # v1 and later (Kafka 4 has no v0): (timestamp, offset, ...).
                if error_code == 0 and len(info) >= 2:
                    found[TopicPartition(topic, partition)] = int(info[1])
    return found


async def partition_leaders(
    admin: AIOKafkaAdminClient, topics: Iterable[str] | None = None
) -> dict[str, dict[TopicPartition, int]]:
    """Per topic that the cluster reports (every one when ``topics`` is None), each
    partition's leader (-1 for none), in partition order."""
    described = await admin.describe_topics(None if topics is None else list(topics))
    return {
        t["topic"]: {
            TopicPartition(t["topic"], p["partition"]): p["leader"]
            for p in sorted(t["partitions"], key=lambda p: int(p["partition"]))
        }
        for t in described
        if t["error_code"] == 0
    }


async def _group_offsets(
    admin: AIOKafkaAdminClient, group_id: str, topic: str
) -> dict[TopicPartition, int]:
    """See :func:`group_offsets`."""
    deadline = time.monotonic() + 15.0
    while True:
        try:
            offsets = await admin.list_consumer_group_offsets(group_id)
            break
        except (CoordinatorNotAvailableError, CoordinatorLoadInProgressError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)
    return {
        tp: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0
    }


async def group_offsets(
    kafka: KafkaConnection,
    group_id: str,
    topic: str,
) -> dict[TopicPartition, int]:
    """The offsets ``group_id`` has committed on ``topic`` (none for a group never run).

    On a cluster where no group has ever committed, the first look-up of a coordinator
    makes Kafka create ``__consumer_offsets`` and answers "coordinator not available"
    until it has: that is waited out (up to 15 s), not reported as a failure."""
    doing = f"reading the offsets of group {group_id}"
    with kafka_errors(kafka.servers, doing):
        async with admin_client(kafka, doing) as admin:
            return await _group_offsets(admin, group_id, topic)


async def topic_extent(
    kafka: KafkaConnection,
    topic: str,
    group_id: str | None = None,
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int], dict[TopicPartition, int]]:
    """Each partition's log start, its end as a ``read_committed`` reader sees it, and
    what ``group_id`` has committed there (empty without a group; see
    :func:`group_offsets`). A partition whose offsets its leader does not give is a
    :class:`~schemas.errors.KafkaUnavailableError`."""
    doing = f"reading the offsets of {topic}"
    with kafka_errors(kafka.servers, doing):
        async with admin_client(kafka, doing) as admin:
            leaders = (await partition_leaders(admin, [topic])).get(topic)
            if not leaders:
                raise TrainerError(
                    f"topic {topic} does not exist on {kafka.servers}; "
                    "run `lorastream topics create`"
                )
            starts = await log_offsets(admin, leaders, EARLIEST)
            ends = await log_offsets(admin, leaders, LATEST, committed=True)
            missing = sorted(tp.partition for tp in leaders if tp not in starts or tp not in ends)
            if missing:
                raise LeaderNotAvailableError(
                    f"no offsets from the leader of {topic} partition(s) {missing}"
                )
            committed: dict[TopicPartition, int] = {}
            if group_id is not None:
                with kafka_errors(kafka.servers, f"reading the offsets of group {group_id}"):
                    committed = await _group_offsets(admin, group_id, topic)
    return starts, ends, committed
