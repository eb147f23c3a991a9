"""``lorastream status``: the pipeline at a glance, read from Kafka alone.

Per adapter: the newest announced version and its age, the learning events
that wait in its open window and the window size they wait for, the windows
quarantined, and a hold (a file of its newest version not as announced, by
the trainer's own check). Per stage: its lag (:class:`GroupLag`, the one
definition that the trainer's ``lorastream_consumer_lag`` gauge shares). And
the dead letters. Everything is read, nothing is written: no group's offsets
move. :func:`read_status` returns data; ``lorastream.cli.status`` prints it.

What the trainer was configured with is learnt from the lineage, never from
the viewer's own settings (its shell may say LORASTREAM_WINDOW_SIZE=16 to a
trainer that runs windows of 4): the window size is
:attr:`trainer.lineage.Lineage.window_size`, None before a first version.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from schemas import AdapterUpdate
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
    window_size: int | None = None  # as the lineage shows it; None before a first version

    def age_seconds(self, now: datetime) -> float | None:
        return None if self.created_at is None else (now - self.created_at).total_seconds()


@dataclass(frozen=True)
class GroupLag:
    """How far ``group`` is behind on ``topic``: per partition, the end offset a
    ``read_committed`` reader sees (the last stable offset) minus the offset the group
    has committed (the log start where it has committed nothing); the total is their sum.
    The one lag of lorastream: ``status``, ``adapters list`` and the trainer's
    ``lorastream_consumer_lag`` gauge (:mod:`trainer.progress`) all count it so."""

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

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "adapters": [
                {
                    "adapter": a.adapter,
                    "version": a.version,
                    "created_at": a.created_at.isoformat() if a.created_at else None,
                    "age_seconds": _rounded(a.age_seconds(self.at)),
                    "pending_events": a.pending,
                    "window_size": a.window_size,
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
    """Per adapter whose newest version is in ``updates``: why the trainer holds it, if a
    file of that version is not as announced (:func:`trainer.hold_reasons.hold_reason`, in
    these settings' store; fetched first from an object store). A LoRA setting that
    differs is the trainer's to say (its log, ``lorastream_adapter_held``): the viewer's
    own LORASTREAM_LORA_* say nothing of the trainer's."""
    from trainer.exceptions import TrainerError
    from trainer.hold_reasons import hold_reason
    from trainer.store import AdapterStore

    store = AdapterStore(settings.adapter_dir, cache=settings.adapter_cache_dir)
    holds = {}
    for update in updates:
        try:
            reason = hold_reason(store, update, update.lora)
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
                window_size=lineage.window_size if lineage is not None else None,
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
    )
