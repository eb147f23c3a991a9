"""``lorastream adapters follow``: committed announcements as they come."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from schemas import AdapterUpdate, SchemaError, decode
from trainer.history import topic_partitions
from trainer.kafka import reader

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
    seen = 0
    async with reader(bootstrap_servers, f"following {topic}", client_options) as consumer:
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
    return seen
