"""The committer: one transactional producer, and the only code that commits anything.

Every announcement, quarantine record and offsets-only commit of the live
trainer, and every announcement of a replay, goes through
:meth:`Committer.commit`: the record (if any) and the consumer offsets (if
any) in ONE Kafka transaction. Its :class:`CommitState` says whether it may
still commit: a committer that was fenced by a newer instance with the same
transactional id, or whose driver failed after taking a window out of its
buffer, commits nothing more, so that the window is read again rather than
skipped.

Starting the producer registers the transactional id with the cluster,
which aborts any transaction that a killed predecessor left open; a driver
therefore starts its committer before it reads the lineages back.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from schemas import Topics, encode
from trainer.core import Outcome, Trained, WindowTrainer
from trainer.exceptions import TrainerError
from trainer.kafka import kafka_errors
from trainer.lineage import Lineage
from trainer.window import Window

__all__ = ["CommitState", "Committer", "Outgoing", "announce", "train_and_commit"]


class CommitState(enum.Enum):
    NEW = "new"  # not started
    READY = "ready"  # may commit
    IN_TRANSACTION = "in-transaction"  # a commit is under way
    FENCED = "fenced"  # another instance owns the transactional id: never commit again
    FAILED = "failed"  # the driver failed with a window taken out: never commit again
    STOPPED = "stopped"


@dataclass(frozen=True)
class Outgoing:
    """One record to commit: topic, key (an adapter name, or None) and value."""

    topic: str
    key: str | None
    value: bytes


class Committer:
    """Commits records and consumer offsets in Kafka transactions, for one transactional id."""

    def __init__(
        self,
        bootstrap_servers: str,
        transactional_id: str,
        group_id: str | None = None,
        client_options: dict[str, Any] | None = None,
        idle_commit_seconds: float = 5.0,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.transactional_id = transactional_id
        self.group_id = group_id
        self.client_options = client_options or {}
        self.idle_commit_seconds = idle_commit_seconds
        self.state = CommitState.NEW
        self._producer: AIOKafkaProducer | None = None
        self._last: dict[TopicPartition, int] = {}
        self._last_at = 0.0

    @property
    def can_commit(self) -> bool:
        return self.state is CommitState.READY

    async def start(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            transactional_id=self.transactional_id,
            enable_idempotence=True,
            acks="all",
            **self.client_options,
        )
        try:
            with kafka_errors(self.bootstrap_servers, f"starting {self.transactional_id}"):
                await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        self.state = CommitState.READY

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self.state in (CommitState.NEW, CommitState.READY):
            self.state = CommitState.STOPPED

    def fail(self) -> None:
        """The driver failed after taking records out: commit nothing more."""
        if self.state is not CommitState.FENCED:
            self.state = CommitState.FAILED

    async def commit(
        self,
        record: Outgoing | None,
        offsets: dict[TopicPartition, int],
        inside: Callable[[], None] | None = None,
    ) -> None:
        """Commit ``record`` and ``offsets`` in one transaction; ``inside`` runs before the end
        (the crash tests use it to fail there, which must abort everything)."""
        if self.state is not CommitState.READY or self._producer is None:
            raise TrainerError(
                f"{self.transactional_id} cannot commit: the committer is {self.state.value}"
            )
        if offsets and self.group_id is None:
            raise TrainerError("offsets can only be committed for a consumer group")
        producer = self._producer
        topic = record.topic if record else "the consumer offsets"
        self.state = CommitState.IN_TRANSACTION
        try:
            async with producer.transaction():
                if record is not None:
                    key = record.key.encode() if record.key is not None else None
                    await (await producer.send(record.topic, key=key, value=record.value))
                if inside is not None:
                    inside()
                if offsets:
                    await producer.send_offsets_to_transaction(offsets, self.group_id)
        except ProducerFenced as exc:
            self.state = CommitState.FENCED
            raise TrainerError(
                f"another instance took over transactional id {self.transactional_id}; this "
                "one stops (give each trainer its own LORASTREAM_INSTANCE_ID)"
            ) from exc
        except KafkaError as exc:
            self.state = CommitState.FAILED
            raise TrainerError(f"the Kafka transaction on {topic} failed: {exc!r}") from exc
        except BaseException:
            self.state = CommitState.FAILED
            raise
        self.state = CommitState.READY
        self._last.update(offsets)
        self._last_at = asyncio.get_running_loop().time()

    async def commit_offsets(self, offsets: dict[TopicPartition, int], force: bool = False) -> None:
        """An offsets-only transaction, when offsets moved and a while has passed (or ``force``)."""
        moved = {tp: o for tp, o in offsets.items() if self._last.get(tp) != o}
        now = asyncio.get_running_loop().time()
        if moved and (force or now - self._last_at >= self.idle_commit_seconds):
            await self.commit(None, moved)


def announce(outcome: Outcome, topics: Topics) -> Outgoing:
    """The record that commits ``outcome``: its AdapterUpdate, or its quarantine record."""
    if isinstance(outcome, Trained):
        return Outgoing(topics.adapter_updates, outcome.update.adapter, encode(outcome.update))
    return Outgoing(topics.quarantine, outcome.adapter, encode(outcome))


async def train_and_commit(
    core: WindowTrainer,
    committer: Committer,
    topics: Topics,
    window: Window,
    lineage: Lineage,
    offsets: dict[TopicPartition, int],
) -> Outcome:
    """What both drivers do with a closed window: train it (in a worker thread), commit the
    outcome with ``offsets`` in one transaction, and only then move the lineage on."""
    outcome = await asyncio.to_thread(core.train, window, lineage)
    version = lineage.version + 1
    await committer.commit(
        announce(outcome, topics),
        offsets,
        inside=lambda: core.faults.at("commit-inside", lineage.adapter, version),
    )
    core.committed(lineage, outcome)
    return outcome
