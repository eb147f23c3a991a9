"""Ranges of a topic to read again (a replay, a repair), and the events that wait for a window.

A range is given by offsets or times (:data:`Bound`) and resolved per partition
against what the log retains now (:func:`resolve_range`); :func:`read_range`
reads it, partition by partition in offset order, through the one committed
reader (:mod:`trainer.committed`). :func:`pending_events` counts, per adapter,
the learning events past the trainer group's committed offsets that no version
has handled yet (``lorastream status``).
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas import LearningEvent, SchemaError, decode
from trainer.committed import drain, group_offsets, read_committed_topic, topic_partitions
from trainer.kafka import KafkaConnection, reader
from trainer.lineage import Lineage
from trainer.window import held_out

__all__ = ["Bound", "PartitionRange", "pending_events", "read_range", "resolve_range"]

Bound = int | datetime
"""One end of a range: an offset, or a time (the record timestamps of the topic)."""


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
    kafka: KafkaConnection,
    topic: str,
    start: Bound | None = None,
    end: Bound | None = None,
) -> list[PartitionRange]:
    """Turn ``start``/``end`` (both inclusive; None = the log's ends) into offsets per partition.

    An offset applies to every partition. A time means the first record at
    or after it (``start``) or the last record at or before it (``end``),
    by record timestamp. A range that reaches below what a partition still
    retains says so in :attr:`PartitionRange.gone`.
    """
    async with reader(kafka, f"reading {topic}") as consumer:
        tps = await topic_partitions(consumer, topic, kafka.servers)
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
    kafka: KafkaConnection,
    ranges: Sequence[PartitionRange],
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
    async with reader(kafka, f"reading {topic}") as consumer:
        consumer.assign([r.tp for r in wanted])
        ends = {}
        for r in wanted:
            consumer.seek(r.tp, max(r.start, (starts or {}).get(r.tp, r.start)))
            ends[r.tp] = r.end
        async for batch in drain(consumer, ends):
            yield batch


async def pending_events(
    kafka: KafkaConnection,
    topic: str,
    group_id: str,
    lineages: dict[str, Lineage],
    eval_fraction: float = 0.0,
) -> dict[str, int]:
    """Per adapter, the learning events that wait for a window: those in open windows and
    those the trainer has not read, less the ones it holds out for evaluation
    (``eval_fraction``, as the trainer's; they never train). Read from the trainer
    group's committed offsets, which never pass an open window's first event."""
    since = await group_offsets(kafka, group_id, topic)
    records, _ = await read_committed_topic(kafka, topic, since)
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
