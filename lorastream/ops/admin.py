"""Topic creation, idempotent, and topic retention, through aiokafka's admin client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, for_code

from schemas import Topics
from schemas.errors import LorastreamError
from trainer.committed import EARLIEST, LATEST, log_offsets, partition_leaders
from trainer.kafka import (
    KafkaConnection,
    admin_client,
    kafka_errors,
    stop_consumer,
    track_topics,
)

__all__ = [
    "KafkaSetupError",
    "TopicInfo",
    "TopicRetention",
    "create_topics",
    "delete_topics",
    "describe_retention",
    "list_topics",
    "require_topics",
    "topic_specs",
]

_TOPIC_ALREADY_EXISTS = 36
_UNKNOWN_TOPIC = 3
_RETENTION_KEYS = ("retention.ms", "retention.bytes", "cleanup.policy")


class KafkaSetupError(LorastreamError):
    """The cluster refused or could not be reached while setting up or inspecting topics."""


@dataclass(frozen=True)
class TopicRetention:
    """What a topic's configuration lets the cluster delete; None where it was not reported.

    ``-1`` is Kafka's "no limit" for both ``retention_ms`` and ``retention_bytes`` (the
    latter per partition); they apply only under the ``delete`` cleanup policy. ``compact``
    removes superseded records of a key, and an empty ``cleanup_policy`` (Kafka 4.2 and
    later) deletes nothing at all.
    """

    retention_ms: int | None
    retention_bytes: int | None
    cleanup_policy: str | None

    @property
    def policies(self) -> frozenset[str]:
        """The cleanup policies in effect, e.g. ``{"delete"}``; empty if none or unknown."""
        return frozenset(p.strip() for p in (self.cleanup_policy or "").split(",") if p.strip())

    @property
    def unlimited(self) -> bool:
        """True when the configuration lets the cluster delete none of the topic's records."""
        if self.cleanup_policy is not None and not self.policies:
            return True
        return (
            "compact" not in self.policies
            and self.retention_ms is not None
            and self.retention_ms < 0
            and self.retention_bytes is not None
            and self.retention_bytes < 0
        )

    def describe(self) -> str:
        """A short phrase for users, e.g. ``retention.ms=604800000 (7 days)``."""
        policies = self.policies
        if self.cleanup_policy is not None and not policies:
            return "unlimited retention (cleanup.policy is empty)"
        limits = []
        # An unreported policy is the broker's default, which is delete unless changed.
        if "delete" in policies or self.cleanup_policy is None:
            if self.retention_ms is not None and self.retention_ms >= 0:
                limits.append(f"retention.ms={self.retention_ms} ({_duration(self.retention_ms)})")
            if self.retention_bytes is not None and self.retention_bytes >= 0:
                limits.append(f"retention.bytes={self.retention_bytes} per partition")
        if "compact" in policies:
            phrase = (
                f"compacted (cleanup.policy={self.cleanup_policy}): "
                "only the latest record of each key is kept"
            )
            return ", and ".join([phrase, *limits]) if limits else phrase
        if limits:
            return " and ".join(limits)
        if self.unlimited:
            return "unlimited retention"
        return "retention not reported by the cluster"

    @classmethod
    def from_configs(cls, configs: Mapping[str, str | None]) -> TopicRetention:
        """From config entries as a broker reports them (values are strings)."""
        return cls(
            retention_ms=_int_or_none(configs.get("retention.ms")),
            retention_bytes=_int_or_none(configs.get("retention.bytes")),
            cleanup_policy=configs.get("cleanup.policy"),
        )


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


_UNITS = (("day", 86_400_000), ("hour", 3_600_000), ("minute", 60_000), ("second", 1_000))


def _duration(ms: int) -> str:
    """``604800000`` -> ``7 days``; exact where a unit divides it, else approximate."""
    for name, size in _UNITS:
        count, rest = divmod(ms, size)
        if count and not rest and (count < 1000 or name == "day"):
            return f"{count} {name}{'' if count == 1 else 's'}"
    for name, size in _UNITS:
        if ms >= size:
            return f"about {ms / size:.1f} {name}s"
    return f"{ms} ms"


def topic_specs(
    topics: Topics, partitions: int, replication_factor: int, history_retention_ms: int = -1
) -> list[NewTopic]:
    """The pipeline's topics. The history (learning events, the adapter lineage and the
    quarantine it reads) gets ``retention.ms=history_retention_ms``, -1 meaning forever;
    the others keep the cluster's default. No size limit (``retention.bytes=-1``) trims
    the history either, whatever the cluster's default."""
    history = {topics.learning_events, topics.adapter_updates, topics.quarantine}
    kept = {"retention.ms": str(history_retention_ms), "retention.bytes": "-1"}
    # The newest snapshot per adapter: compacted, in small segments cleaned eagerly, so that
    # a resume reads about one record per adapter, not one per version.
    compacted = {
        "cleanup.policy": "compact",
        "min.cleanable.dirty.ratio": "0.01",
        "segment.bytes": str(1 << 20),
        "segment.ms": "60000",
    }
    specs = []
    for name in topics.all():
        configs = dict(kept) if name in history else {}
        if name == topics.adapter_latest:
            configs = dict(compacted)
        specs.append(NewTopic(name, partitions, replication_factor, topic_configs=configs))
    return specs


@asynccontextmanager
async def _admin(kafka: KafkaConnection, doing: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client, closed on every path; Kafka errors become KafkaSetupError
    (a secured cluster that refused us, a KafkaAuthenticationError that says why)."""
    try:
        async with admin_client(kafka, doing, request_timeout_ms=30_000) as admin:
            yield admin
    except KafkaError as exc:
        raise KafkaSetupError(
            f"could not {doing} on {kafka.servers}: {exc!r}. Is the broker running "
            "(`lorastream broker status`) and KAFKA_BOOTSTRAP_SERVERS right?"
        ) from exc


async def _wait_for_leaders(
    admin: AIOKafkaAdminClient, names: list[str], timeout: float = 30.0
) -> None:
    """Wait until every partition of ``names`` has a leader: a producer that starts
    right after creation would otherwise log NotLeaderForPartition retries."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        # Every topic's metadata: asking for these names would create one that failed.
        leaders = await partition_leaders(admin)
        ready = all(
            (partitions := leaders.get(name)) and all(leader >= 0 for leader in partitions.values())
            for name in names
        )
        if ready or asyncio.get_running_loop().time() >= deadline:
            return
        await asyncio.sleep(0.1)


async def _wait_until_served(
    kafka: KafkaConnection, names: list[str], timeout: float = 30.0
) -> None:
    """Return once every partition of ``names`` is served by its leader.

    A new partition's leader appears in the metadata a moment before the broker
    acts as its leader: a producer that starts in between gets
    NotLeaderForPartitionError, retries and logs it. A ListOffsets request is
    answered only by the partition's real leader, and the consumer retries it
    quietly, so once it answers for every partition, producers go straight through.
    """
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        enable_auto_commit=False, retry_backoff_ms=20, **kafka.client_kwargs()
    )
    try:
        with kafka_errors(kafka.servers, "waiting for the new topics' leaders"):
            await consumer.start()
            partitions = []
            await track_topics(consumer, names)
            for name in names:
                partitions += [
                    TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or ()
                ]
            await asyncio.wait_for(consumer.end_offsets(partitions), timeout)
    finally:
        await stop_consumer(consumer)


async def create_topics(
    kafka: KafkaConnection,
    specs: list[NewTopic],
) -> dict[str, str]:
    """Create each topic unless it exists; return ``{name: "created" | "exists"}``."""
    async with _admin(kafka, "create topics") as admin:
        response = await admin.create_topics(specs)
        await _wait_for_leaders(admin, [spec.name for spec in specs])
    # The metadata names a new leader a moment before it acts as one: a producer right
    # after `topics create` would log NotLeaderForPartitionError retries.
    await _wait_until_served(kafka, [spec.name for spec in specs])
    outcome: dict[str, str] = {}
    for topic, code, *rest in response.topic_errors:
        if code == 0:
            outcome[topic] = "created"
        elif code == _TOPIC_ALREADY_EXISTS:
            outcome[topic] = "exists"
        else:
            message = rest[0] if rest and rest[0] else for_code(code).__name__
            raise KafkaSetupError(f"topic {topic} could not be created: {message} (code {code})")
    return outcome


async def describe_retention(
    kafka: KafkaConnection,
    topics: list[str],
) -> dict[str, TopicRetention]:
    """Each topic's retention as the cluster reports it, in the order given.

    A topic the cluster does not know, or refuses to describe, is a KafkaSetupError
    naming it.
    """
    names = list(dict.fromkeys(topics))
    if not names:
        return {}
    wanted = dict.fromkeys(_RETENTION_KEYS)
    resources = [ConfigResource(ConfigResourceType.TOPIC, name, wanted) for name in names]
    async with _admin(kafka, "describe topic configs") as admin:
        responses = await admin.describe_configs(resources)
    found = _retention_by_topic(responses)
    missing = [name for name in names if name not in found]
    if missing:
        raise KafkaSetupError(
            f"{kafka.servers} did not report the configuration of {', '.join(missing)}"
        )
    return {name: found[name] for name in names}


def _retention_by_topic(responses: Iterable[Any]) -> dict[str, TopicRetention]:
    """Read raw DescribeConfigs responses (one per request aiokafka sent).

    Read by position, which the Kafka protocol keeps across versions (later ones only
    append fields): resource = (error_code, error_message, resource_type, resource_name,
    config_entries, ...), entry = (name, value, ...). aiokafka's field names are not
    part of that contract.
    """
    found: dict[str, TopicRetention] = {}
    for response in responses:
        for resource in response.resources:
            error_code, error_message, _type, name, entries = resource[:5]
            if error_code:
                reason = error_message or for_code(error_code).__name__
                raise KafkaSetupError(
                    f"topic {name}: the cluster would not describe its configuration: "
                    f"{reason} (code {error_code})"
                )
            found[name] = TopicRetention.from_configs({entry[0]: entry[1] for entry in entries})
    return found


@dataclass(frozen=True)
class TopicInfo:
    """A topic as the cluster reports it: partitions, and the offsets they hold now."""

    name: str
    partitions: int
    # Sum over partitions of high watermark - log start offset: the records, plus one
    # marker per transaction. None when a partition's offsets were not reported (no
    # leader, or the topic is being deleted).
    records: int | None


async def list_topics(
    kafka: KafkaConnection,
    prefix: str = "",
) -> list[TopicInfo]:
    """The cluster's topics whose name starts with ``prefix`` (internal ones left out),
    sorted by name, with their partitions and the offsets they retain.

    One metadata request and one ListOffsets request per leader: a consumer would
    learn each topic's metadata in a round trip of its own, which on a cluster of
    hundreds of topics outlasts its request timeout.
    """
    async with _admin(kafka, "list topics") as admin:
        leaders = {
            name: by_partition
            for name, by_partition in sorted((await partition_leaders(admin)).items())
            if name.startswith(prefix) and not name.startswith("__")
        }
        every = {
            tp: leader for by_partition in leaders.values() for tp, leader in by_partition.items()
        }
        starts = await log_offsets(admin, every, EARLIEST)
        ends = await log_offsets(admin, every, LATEST)
    partitions = {name: list(by_partition) for name, by_partition in leaders.items()}
    return [
        TopicInfo(
            name,
            len(tps),
            sum(ends[tp] - starts[tp] for tp in tps)
            if all(tp in starts and tp in ends for tp in tps)
            else None,
        )
        for name, tps in partitions.items()
    ]


async def require_topics(
    kafka: KafkaConnection,
    names: list[str],
) -> None:
    """Check the cluster answers and has every topic in ``names``; a KafkaSetupError
    naming the missing ones (and the command that makes them) otherwise."""
    async with _admin(kafka, "list topics") as admin:
        existing = set(await admin.list_topics())
    missing = [name for name in names if name not in existing]
    if missing:
        raise KafkaSetupError(
            f"topic{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"{'do' if len(missing) > 1 else 'does'} not exist on {kafka.servers}; "
            "run `lorastream topics create`"
        )


async def delete_topics(
    kafka: KafkaConnection,
    names: list[str],
) -> list[str]:
    """Delete the named topics; return those deleted (a topic already gone is skipped)."""
    if not names:
        return []
    async with _admin(kafka, "delete topics") as admin:
        existing = set(await admin.list_topics())
        doomed = [n for n in names if n in existing]
        if not doomed:
            return []
        response = await admin.delete_topics(doomed)
    deleted = []
    for topic, code, *_ in response.topic_error_codes:
        if code == 0 or code == _UNKNOWN_TOPIC:
            deleted.append(topic)
        else:
            raise KafkaSetupError(
                f"topic {topic} could not be deleted: {for_code(code).__name__} (code {code})"
            )
    return sorted(deleted)
