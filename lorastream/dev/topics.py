"""Topics for a run on a real broker: made under a prefix, and records produced into them.

It serves the tests, ``bench/`` and the soak; the product never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from lorastream.ops.admin import create_topics, topic_specs
from schemas import Topics
from trainer.kafka import KafkaConnection

__all__ = ["make_topics", "produce"]


async def make_topics(bootstrap: str, prefix: str, partitions: int = 1) -> Topics:
    """Every pipeline topic named under ``prefix``, created with ``partitions`` each (on a
    plaintext broker, as every broker of the tests and the benchmarks is)."""
    topics = Topics.named(prefix)
    await create_topics(KafkaConnection(bootstrap), topic_specs(topics, partitions, 1))
    return topics


async def produce(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes | None]]
) -> list[RecordMetadata]:
    """``records`` (key, value) into ``topic``, acknowledged by all replicas; where each went."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v) for k, v in records]
        return [await f for f in futures]
    finally:
        await producer.stop()
