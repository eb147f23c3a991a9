"""The Faust app whose agent scores GenerationResults into LearningEvents.

At-least-once: Faust acknowledges an input record only after the agent has
handled it, and flushes its producer before it commits offsets, so a worker
killed at any point repeats records rather than losing them. Faust's
``exactly_once`` guarantee has open bugs and is not used; duplicates carry
the same ``id`` and source position, and the trainer skips ids it has
already trained.

Records are read as raw bytes and decoded by :func:`streams.scoring.process`,
so no input, however broken, can stop the agent: it becomes a dead letter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust

from schemas import KafkaPosition, Topics, dead_letter_headers, encode
from streams.metrics import ScoringMetrics
from streams.scoring import Thresholds, process

__all__ = ["ScoringConfig", "create_app"]

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
    extra: dict[str, Any] = field(default_factory=dict)


def _broker_urls(bootstrap_servers: str) -> list[str]:
    return [
        f"kafka://{server.strip()}" for server in bootstrap_servers.split(",") if server.strip()
    ]


def create_app(config: ScoringConfig, metrics: ScoringMetrics | None = None) -> faust.App:
    """A Faust app with the scoring agent on ``config.topics.generation_results``."""
    metrics = metrics or ScoringMetrics()
    config.data_dir.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    app = faust.App(
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
        web_enabled=config.web_port is not None,
        web_port=config.web_port or 6066,
        web_bind="127.0.0.1",
        **config.extra,
    )
    source = app.topic(
        config.topics.generation_results, key_serializer="raw", value_serializer="raw"
    )
    events_out = app.topic(
        config.topics.learning_events, key_serializer="raw", value_serializer="raw"
    )
    dead_letters = app.topic(
        config.topics.dead_letters, key_serializer="raw", value_serializer="raw"
    )
    thresholds = config.thresholds

    @app.agent(source, name="score")
    async def score(stream: faust.StreamT[Any]) -> None:
        async for record in stream.events():
            message = record.message
            position = KafkaPosition(message.topic, message.partition, message.offset)
            timestamp_ms = None if message.timestamp is None else round(message.timestamp * 1000)
            outcome = process(message.value, position, timestamp_ms, thresholds)
            if outcome.error is not None:
                metrics.dead_letters.inc()
                log.warning("dead letter: %s", outcome.error)
                await dead_letters.send(
                    key=message.key,
                    value=message.value,
                    headers=dead_letter_headers(outcome.error, position, timestamp_ms),
                )
                continue
            metrics.scored.inc()
            if outcome.event is None:
                continue
            metrics.qualified.inc()
            if outcome.event.is_breakthrough:
                metrics.breakthroughs.inc()
            await events_out.send(key=outcome.event.adapter.encode(), value=encode(outcome.event))

    return app
