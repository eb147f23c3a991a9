"""Topic creation, idempotent, through aiokafka's admin client."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, for_code

from schemas import Topics
from schemas.errors import LorastreamError

__all__ = ["KafkaSetupError", "create_topics", "topic_specs"]

_TOPIC_ALREADY_EXISTS = 36


class KafkaSetupError(LorastreamError):
    """The cluster refused or could not be reached while setting up topics."""


def topic_specs(topics: Topics, partitions: int, replication_factor: int) -> list[NewTopic]:
    """The pipeline's topics. Announcements are kept forever: they are the lineage."""
    specs = []
    for name in topics.all():
        configs = {"retention.ms": "-1"} if name == topics.adapter_updates else {}
        specs.append(NewTopic(name, partitions, replication_factor, topic_configs=configs))
    return specs


async def _wait_for_leaders(
    admin: AIOKafkaAdminClient, names: list[str], timeout: float = 30.0
) -> None:
    """Wait until every partition of ``names`` has a leader: a producer that starts
    right after creation would otherwise log NotLeaderForPartition retries."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        metadata = await admin._client.fetch_all_metadata()
        ready = all(
            (partitions := metadata.partitions_for_topic(name))
            and all(
                (metadata.leader_for_partition(TopicPartition(name, p)) or -1) >= 0
                for p in partitions
            )
            for name in names
        )
        if ready or asyncio.get_running_loop().time() >= deadline:
            return
        await asyncio.sleep(0.1)


async def create_topics(
    bootstrap_servers: str,
    specs: list[NewTopic],
    client_options: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Create each topic unless it exists; return ``{name: "created" | "exists"}``."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=30_000, **(client_options or {})
    )
    try:
        await admin.start()
        response = await admin.create_topics(specs)
        await _wait_for_leaders(admin, [spec.name for spec in specs])
    except KafkaError as exc:
        raise KafkaSetupError(
            f"could not create topics on {bootstrap_servers}: {exc!r}. Is the broker running "
            "(`lorastream broker status`) and KAFKA_BOOTSTRAP_SERVERS right?"
        ) from exc
    finally:
        await admin.close()
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
