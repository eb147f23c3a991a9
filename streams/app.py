"""The Faust app whose agent scores GenerationResults into LearningEvents.

At-least-once: Faust acknowledges an input record only after the agent has
handled it, and flushes its producer before it commits offsets, so a worker
killed at any point repeats records rather than losing them. Faust's
``exactly_once`` guarantee has open bugs and is not used; duplicates carry
the same ``id`` and source position, and the trainer skips ids it has
already trained.

Records are read in batches, as raw bytes, and routed by :func:`streams.routing.route`,
so no input, however broken, can stop the agent: it becomes a dead letter.
Nothing is skipped without a trace: the agent acknowledges a record only once
what it wrote for it (a LearningEvent or a dead letter) is acknowledged by the
broker; :class:`streams.delivery.Writer` retries, dead-letters what the broker
refuses, and never gives up on a dead letter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from schemas import KafkaPosition, Topics
from streams.delivery import Delivery, RetryPolicy, Writer
from streams.metrics import ScoringMetrics
from streams.routing import EventRecord, Output, Routing, SourceRecord, route
from streams.scoring import Thresholds

__all__ = ["ScoringApp", "ScoringConfig", "create_app"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringConfig:
    """Everything the scoring worker needs; built by the CLI from settings."""

    bootstrap_servers: str
    topics: Topics
    app_id: str
    thresholds: Thresholds = field(default_factory=Thresholds)
    data_dir: Path = Path(".lorastream/faust")
    web_port: int | None = None
    # Faust's 60 s default keeps a crashed worker's partitions unassigned for a minute;
    # 10 s is Kafka's own consumer default.
    session_timeout: float = 10.0
    credentials: Any = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Records scored as one batch, and how long a batch waits to fill before it goes
    # (the latency a lone record pays).
    batch_size: int = 1000
    batch_wait: float = 0.01
    fetch_bytes: int = 8 * 2**20
    extra: dict[str, Any] = field(default_factory=dict)


def _broker_urls(bootstrap_servers: str) -> list[str]:
    return [
        f"kafka://{server.strip()}" for server in bootstrap_servers.split(",") if server.strip()
    ]


class ScoringApp:
    """The scoring worker, in parts: the Faust app and its agent (:meth:`score`), the routing
    of a batch (:meth:`route`), the delivery of its outputs (:meth:`send`,
    :meth:`finish`) and the metrics each part counts. :attr:`app` is what Faust runs."""

    def __init__(self, config: ScoringConfig, metrics: ScoringMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or ScoringMetrics()
        self.app = _faust_app(config)
        self.source = self.app.topic(
            config.topics.generation_results, key_serializer="raw", value_serializer="raw"
        )
        self.writer = Writer(
            self.send,
            start=self.start,
            events_topic=config.topics.learning_events,
            policy=config.retry,
            metrics=self.metrics,
        )
        self.app.agent(self.source, name="score")(self.score)

    # ── delivery ─────────────────────────────────────────────────────────────

    async def start(self, output: Output) -> Awaitable[object]:
        """Hand ``output`` to the producer; the awaitable is the broker's acknowledgement."""
        # Straight to the producer (Faust's ProducerT.send): the bytes are final, and a
        # topic's send, with its channel, serializers and callbacks, cost as much per
        # record as scoring it.
        topics, producer = self.config.topics, self.app.producer
        if isinstance(output, EventRecord):
            return await producer.send(
                topics.learning_events, output.key, output.value, None, None, None
            )
        return await producer.send(
            topics.dead_letters, output.key, output.value, None, None, output.headers
        )

    async def send(self, output: Output) -> None:
        await (await self.start(output))  # the broker's acknowledgement, or its refusal raised

    async def finish(
        self,
        stream: faust.StreamT[Any],
        events: list[Any],
        items: list[tuple[SourceRecord, Output | None]],
        routings: list[Routing],
        deliveries: list[Delivery],
    ) -> None:
        """Once a batch's outputs are all written: count them, then ack its events."""
        outputs = await self.writer.settle(items, deliveries)
        for routing, written in zip(routings, outputs, strict=True):
            self.count_written(routing, written)
        for event in events:
            await stream.ack(event)

    # ── routing and metrics ──────────────────────────────────────────────────

    def route(self, records: list[SourceRecord]) -> list[Routing]:
        """What each record of a batch becomes; a scoring that raised is said once here."""
        routings = [route(record, self.config.thresholds) for record in records]
        for record, routing in zip(records, routings, strict=True):
            if routing.failure is not None:
                self.metrics.scoring_errors.inc()
                log.error(
                    "scoring %s raised %s; sent to the dead letters",
                    record.position,
                    routing.failure,
                )
            elif routing.outcome is not None and routing.outcome.error is None:
                self.metrics.scored.inc()
        return routings

    def count_written(self, routing: Routing, written: Output | None) -> None:
        """Count what was written for one record: a LearningEvent, or a dead letter."""
        if isinstance(written, EventRecord):
            self.metrics.qualified.inc()
            if written.event.is_breakthrough:
                self.metrics.breakthroughs.inc()
        elif written is not None:
            self.metrics.dead_letters.inc()
            if routing.failure is None:  # else logged by route(), once
                log.warning("dead letter: %s", written.reason)

    # ── the agent ────────────────────────────────────────────────────────────

    async def score(self, stream: faust.StreamT[Any]) -> None:
        """The agent on ``generation-results``: batches routed, written, then acked."""
        # Records come in batches, scored one after the other, their outputs handed to the
        # producer at once. While one batch's deliveries are awaited, the next is read and
        # scored; its outputs go to the producer only after the previous batch's, so each
        # partition keeps its order. Acks are manual: Faust would ack an event in the
        # `finally` of its stream iterator, also when this body raised or was cancelled (a
        # rebalance, SIGTERM), and commit past it; here a batch's events are acked only
        # once all its outputs are written, batch after batch in the order read.
        batches = cast(faust.Stream[Any], stream).noack_take(
            self.config.batch_size, within=self.config.batch_wait
        )
        settling: asyncio.Future[None] | None = None
        try:
            async for events in batches:
                records = [_source_record(event.message) for event in events]
                routings = self.route(records)
                items = [(r, routing.output) for r, routing in zip(records, routings, strict=True)]
                deliveries = await self.writer.start_many(items)
                if settling is not None:
                    await settling
                settling = asyncio.ensure_future(
                    self.finish(stream, list(events), items, routings, deliveries)
                )
            if settling is not None:
                await settling
        finally:
            if settling is not None and not settling.done():
                settling.cancel()  # its events stay unacked: read again by the next owner


def create_app(config: ScoringConfig, metrics: ScoringMetrics | None = None) -> faust.App:
    """A Faust app with the scoring agent on ``config.topics.generation_results``."""
    return ScoringApp(config, metrics).app


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, minus aiokafka's own CancelledError on stop.

    aiokafka 0.14's fetcher cancels its pending fetch tasks on close and awaits them
    without catching their CancelledError (``trainer.kafka.stop_consumer`` says more), so
    stopping after the broker went away raised it in this thread: the thread died with a
    traceback, and the worker waited for it until the stop deadline (#22)."""

    async def on_thread_stop(self) -> None:
        try:
            await super().on_thread_stop()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class _App(faust.App):
    """A Faust app whose consumer thread stops cleanly when the broker is gone."""

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)


def _faust_app(config: ScoringConfig) -> faust.App:
    """The Faust app, its options set for the scoring worker (no agent yet)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    return _App(
        config.app_id,
        broker=_broker_urls(config.bootstrap_servers),
        broker_credentials=config.credentials,
        datadir=str(config.data_dir / config.app_id),
        # A new group starts at the earliest retained record: nothing produced
        # before the first start of the worker is missed.
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_session_timeout=config.session_timeout,
        broker_heartbeat_interval=min(3.0, config.session_timeout / 3),
        topic_disable_leader=True,
        # Bytes a fetch brings per partition. At Faust's 1 MiB (about 280 results of 200
        # tokens), reading a backlog stalled for a second every few fetches, the consumer's
        # getmany returning nothing until its timeout although the partitions were neither
        # paused nor drained (bench/bench_scoring.py: 1,250 results/s); at 8 MiB, 2,750.
        consumer_max_fetch_size=config.fetch_bytes,
        web_enabled=config.web_port is not None,
        web_port=config.web_port or 6066,
        web_bind="127.0.0.1",
        **config.extra,
    )


def _source_record(message: Any) -> SourceRecord:
    return SourceRecord(
        key=message.key,
        value=message.value,
        position=KafkaPosition(message.topic, message.partition, message.offset),
        timestamp_ms=None if message.timestamp is None else round(message.timestamp * 1000),
    )
