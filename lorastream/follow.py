"""``lorastream adapters follow``: committed announcements as they come."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer

from schemas import AdapterUpdate, SchemaError, decode
from trainer.lineage import topic_partitions

__all__ = ["follow"]


async def follow(
    bootstrap_servers: str,
    topic: str,
    on_update: Callable[[AdapterUpdate, bytes], None],
    *,
    from_beginning: bool = False,
    count: int | None = None,
    timeout: float | None = None,
    client_options: dict[str, Any] | None = None,
) -> int:
    """Call ``on_update`` for each committed AdapterUpdate; return how many were seen.

    Reads without a consumer group (every follower sees everything) and with
    ``read_committed``, so an announcement appears only once its transaction,
    and so its window's offsets, are committed.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        isolation_level="read_committed",
        **(client_options or {}),
    )
    await consumer.start()
    seen = 0
    try:
        tps = await topic_partitions(consumer, topic, bootstrap_servers)
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while count is None or seen < count:
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                break
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    try:
                        update = decode(record.value, AdapterUpdate)
                    except SchemaError:
                        continue
                    on_update(update, record.value or b"")
                    seen += 1
    finally:
        await consumer.stop()
    return seen
