"""Running serve in-process against a contract server, and waiting for what it does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

from lorastream.serving import Serve, ServeConfig, ServeMetrics
from schemas import AdapterUpdate, Topics, encode
from tests.kafka_util import produce
from tests.serving.contract import ContractServer

__all__ = ["announce", "config_for", "eventually", "running"]


def config_for(
    bootstrap: str, topics: Topics, prefix: str, server: ContractServer, **more: Any
) -> ServeConfig:
    options: dict[str, Any] = {
        "keep": 2,
        "drain_seconds": 0.5,
        "poll_seconds": 0.2,
        "backoff_start": 0.1,
        "backoff_max": 0.4,
    }
    options.update(more)
    return ServeConfig(
        bootstrap_servers=bootstrap,
        updates_topic=topics.adapter_updates,
        group_id=f"{prefix}lorastream-serve",
        backend=server.kind,
        url=server.url,
        **options,
    )


async def announce(bootstrap: str, topics: Topics, updates: Sequence[AdapterUpdate]) -> None:
    await produce(
        bootstrap,
        topics.adapter_updates,
        [(u.adapter.encode(), encode(u)) for u in updates],
    )


async def eventually(check: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running(config: ServeConfig) -> AsyncIterator[Serve]:
    """Serve as an asyncio task; cancelled (as a kill would end it) on exit."""
    serve = Serve(config, ServeMetrics())
    task = asyncio.create_task(serve.run())
    try:
        await eventually(lambda: serve.ready.is_set() or task.done(), what="serve ready")
        if task.done():
            task.result()
        yield serve
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def committed(bootstrap: str, group: str, topic: str) -> int | None:
    """The group's committed offset of partition 0 of ``topic``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(TopicPartition(topic, 0))
        return offset
    finally:
        await consumer.stop()
