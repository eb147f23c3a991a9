"""The one place where Kafka client errors become ours, and clients that always close.

Every command and stage that talks to Kafka through aiokafka does it inside
:func:`kafka_errors`, so a broker that is down, a name that does not resolve
or a request that times out reaches the user as one
:class:`~schemas.errors.KafkaUnavailableError` naming the servers and what
was being done, never as a traceback. :func:`reader` starts a group-less
``read_committed`` consumer and stops it on every path, including a failed
start (aiokafka warns about an unclosed client otherwise).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from schemas.errors import KafkaUnavailableError

__all__ = ["kafka_errors", "reader", "stop_consumer"]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(exc).strip()
    name = type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


@contextmanager
def kafka_errors(servers: str, doing: str) -> Iterator[None]:
    """Translate aiokafka's errors and timeouts raised inside; anything else passes."""
    try:
        yield
    except (KafkaError, TimeoutError) as exc:
        raise KafkaUnavailableError(servers, doing, _reason(exc)) from exc


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, minus aiokafka's own CancelledError.

    aiokafka 0.14's fetcher cancels its pending fetch tasks on close and awaits them
    without catching their CancelledError, so stopping a consumer whose broker went
    away (a fetch sleeping before a retry) raises CancelledError although nobody
    cancelled us. A cancellation of the caller's own task still propagates.
    """
    import asyncio

    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


@asynccontextmanager
async def reader(
    servers: str, doing: str, client_options: dict[str, Any] | None = None, **options: Any
) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer without a group (``read_committed`` unless ``options`` say
    otherwise, no auto commit)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers,
        **{
            "enable_auto_commit": False,
            "isolation_level": "read_committed",
            **(client_options or {}),
            **options,
        },
    )
    try:
        with kafka_errors(servers, doing):
            await consumer.start()
            yield consumer
    finally:
        await stop_consumer(consumer)
