"""``lorastream status``: the pipeline at a glance, read from Kafka alone.

Per adapter: the newest announced version and its age, the learning events
that wait in its open window, the windows quarantined, and a hold (why the
trainer cannot step on its newest version: a file not as announced, or a
LoRA setting that differs from the lineage's, by the trainer's own checks).
Per stage: the lag of
its consumer group (the records of its input topic past the group's
committed offsets). And the dead letters. Everything is read, nothing is
written: no group's offsets move. :func:`read_status` returns data;
``lorastream.cli.status`` prints it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from schemas import AdapterUpdate, LoraSpec
from trainer.committed import topic_extent
from trainer.history import load_lineages
from trainer.kafka import KafkaConnection
from trainer.ranges import pending_events

if TYPE_CHECKING:
    from lorastream.settings import Settings

__all__ = ["AdapterStatus", "GroupLag", "Status", "holds_of", "read_status"]


@dataclass(frozen=True)
class AdapterStatus:
    """One adapter: ``version`` 0 and ``created_at`` None before its first version."""

    adapter: str
    version: int
    created_at: datetime | None
    pending: int
    quarantined: int
    hold: str | None = None  # why the trainer holds this adapter, or None

    def age_seconds(self, now: datetime) -> float | None:
        return None if self.created_at is None else (now - self.created_at).total_seconds()


@dataclass(frozen=True)
class GroupLag:
    """How far ``group`` is behind on ``topic``: per partition, the end offset minus the
    committed offset (minus the log start where the group has committed nothing)."""

    group: str
    topic: str
    partitions: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.partitions.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "topic": self.topic,
            "total": self.total,
            "partitions": {str(p): lag for p, lag in sorted(self.partitions.items())},
        }


@dataclass(frozen=True)
class Status:
    """What ``lorastream status`` shows, as of ``at``."""

    at: datetime
    adapters: list[AdapterStatus]
    scorer: GroupLag
    trainer: GroupLag
    dead_letters: int
    dead_letter_topic: str
    window_size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "window_size": self.window_size,
            "adapters": [
                {
                    "adapter": a.adapter,
                    "version": a.version,
                    "created_at": a.created_at.isoformat() if a.created_at else None,
                    "age_seconds": _rounded(a.age_seconds(self.at)),
                    "pending_events": a.pending,
                    "quarantined_windows": a.quarantined,
                    "hold": a.hold,
                }
                for a in self.adapters
            ],
            "lag": {"scorer": self.scorer.to_json(), "trainer": self.trainer.to_json()},
            "dead_letters": {"topic": self.dead_letter_topic, "records": self.dead_letters},
        }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


async def group_lag(kafka: KafkaConnection, group: str, topic: str) -> GroupLag:
    """``group``'s lag on ``topic`` (see :class:`GroupLag`)."""
    starts, ends, committed = await topic_extent(kafka, topic, group)
    return GroupLag(
        group,
        topic,
        {tp.partition: max(0, end - committed.get(tp, starts[tp])) for tp, end in ends.items()},
    )


def holds_of(settings: Settings, updates: list[AdapterUpdate]) -> dict[str, str]:
    """Per adapter whose newest version is in ``updates``: why the trainer holds it, if it
    does (:func:`trainer.hold_reasons.hold_reason`, with these settings' store and LoRA settings).
    Reads every file of each newest version (fetched first from an object store)."""
    from lorastream.stages import lora_settings
    from trainer.exceptions import TrainerError
    from trainer.hold_reasons import hold_reason
    from trainer.store import AdapterStore

    lora = lora_settings(settings)
    configured = LoraSpec(
        r=lora.r,
        alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        dropout=lora.dropout,
    )
    store = AdapterStore(settings.adapter_dir, cache=settings.adapter_cache_dir)
    holds = {}
    for update in updates:
        try:
            reason = hold_reason(store, update, configured)
        except TrainerError as exc:  # an object store that does not answer, say
            reason = str(exc)
        if reason is not None:
            holds[update.adapter] = reason
    return holds


async def read_status(settings: Settings) -> Status:
    """Everything ``lorastream status`` shows. The caller checks the topics exist."""
    kafka, topics = settings.kafka_connection(), settings.topics
    from lorastream.stages import reader_verifier

    lineages = await load_lineages(
        kafka,
        topics.adapter_updates,
        topics.quarantine,
        verifier=reader_verifier(settings),
    )
    pending = await pending_events(
        kafka,
        topics.learning_events,
        settings.trainer_group_id,
        lineages,
        settings.eval_fraction,
    )
    newest = [lin.latest for lin in lineages.values() if lin.latest is not None]
    holds = await asyncio.to_thread(holds_of, settings, newest)
    adapters = []
    for name in sorted(lineages.keys() | pending.keys()):
        lineage = lineages.get(name)
        latest = lineage.latest if lineage is not None else None
        adapters.append(
            AdapterStatus(
                adapter=name,
                version=latest.version if latest else 0,
                created_at=latest.created_at if latest else None,
                pending=pending.get(name, 0),
                quarantined=lineage.quarantined if lineage is not None else 0,
                hold=holds.get(name),
            )
        )
    scorer = await group_lag(kafka, settings.scorer_app_id, topics.generation_results)
    trainer = await group_lag(kafka, settings.trainer_group_id, topics.learning_events)
    starts, ends, _ = await topic_extent(kafka, topics.dead_letters)
    return Status(
        at=datetime.now(UTC),
        adapters=adapters,
        scorer=scorer,
        trainer=trainer,
        dead_letters=sum(ends[tp] - starts[tp] for tp in ends),
        dead_letter_topic=topics.dead_letters,
        window_size=settings.window_size,
    )
