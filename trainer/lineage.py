"""Each adapter's history, rebuilt from the committed records of Kafka.

The announcements on ``adapter-updates`` are the lineage: versions 1, 2, 3 …
with their windows. With the quarantine records they also say, per source
partition, up to which offset an adapter's events are handled, so a window
re-read after a crash is recognised and not trained twice. Only committed
records are read (``read_committed``), so a version whose transaction
aborted never counts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas import AdapterUpdate, SchemaError, decode
from trainer.exceptions import TrainerError
from trainer.quarantine import Quarantined

__all__ = ["Lineage", "load_lineages", "read_committed_topic", "topic_partitions"]

log = logging.getLogger(__name__)


@dataclass
class Lineage:
    """What is known of one adapter: its announced versions and the events they consumed."""

    adapter: str
    updates: list[AdapterUpdate] = field(default_factory=list)
    trained_ids: set[str] = field(default_factory=set)
    handled: dict[TopicPartition, int] = field(default_factory=dict)
    quarantined: int = 0

    @property
    def version(self) -> int:
        return self.updates[-1].version if self.updates else 0

    @property
    def latest(self) -> AdapterUpdate | None:
        return self.updates[-1] if self.updates else None

    def record_update(self, update: AdapterUpdate) -> None:
        if update.version != self.version + 1:
            raise TrainerError(
                f"adapter {self.adapter}: announcement of version {update.version} follows "
                f"version {self.version}; the adapter-updates topic has a gap or a repeat"
            )
        self.updates.append(update)
        self.trained_ids.update(update.window.event_ids)
        self._handled(update.window.topic, update.window.partition, update.window.last_offset)

    def record_quarantine(self, topic: str, partition: int, last_offset: int) -> None:
        self.quarantined += 1
        self._handled(topic, partition, last_offset)

    def _handled(self, topic: str, partition: int, last_offset: int) -> None:
        tp = TopicPartition(topic, partition)
        self.handled[tp] = max(self.handled.get(tp, -1), last_offset)

    def is_handled(self, tp: TopicPartition, offset: int) -> bool:
        return offset <= self.handled.get(tp, -1)


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


async def read_committed_topic(
    bootstrap_servers: str, topic: str, client_options: dict[str, Any] | None = None
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every committed record of ``topic`` as of now, partition by partition in offset order."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        isolation_level="read_committed",
        **(client_options or {}),
    )
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic, bootstrap_servers)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[ConsumerRecord[bytes, bytes]] = []
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for part in batch.values():
                records.extend(part)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        return records
    finally:
        await consumer.stop()


def _lineages_from(
    updates: Iterable[ConsumerRecord[bytes, bytes]],
    quarantined: Iterable[ConsumerRecord[bytes, bytes]],
) -> dict[str, Lineage]:
    lineages: dict[str, Lineage] = {}
    for record in sorted(updates, key=lambda r: (r.partition, r.offset)):
        try:
            update = decode(record.value, AdapterUpdate)
        except SchemaError as exc:
            log.warning(
                "skipping an unreadable announcement at %s[%s]@%s: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )
            continue
        lineage = lineages.setdefault(update.adapter, Lineage(update.adapter))
        lineage.record_update(update)
    for record in quarantined:
        try:
            entry = Quarantined.model_validate_json(record.value or b"")
        except ValueError:
            continue
        if entry.adapter is None:
            continue
        lineage = lineages.setdefault(entry.adapter, Lineage(entry.adapter))
        if entry.window is not None:
            w = entry.window
            lineage.record_quarantine(w.topic, w.partition, w.last_offset)
    return lineages


async def load_lineages(
    bootstrap_servers: str,
    updates_topic: str,
    quarantine_topic: str | None = None,
    client_options: dict[str, Any] | None = None,
) -> dict[str, Lineage]:
    """Every adapter's lineage from the committed announcements (and quarantine records)."""
    updates = await read_committed_topic(bootstrap_servers, updates_topic, client_options)
    quarantined = (
        await read_committed_topic(bootstrap_servers, quarantine_topic, client_options)
        if quarantine_topic
        else []
    )
    return _lineages_from(updates, quarantined)
