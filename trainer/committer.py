"""The committer: one transactional producer, and the only code that commits anything.

Every announcement, quarantine record and offsets-only commit of the live
trainer, and every announcement of a replay, goes through
:meth:`Committer.commit`: the record (if any) and the consumer offsets (if
any) in ONE Kafka transaction. It commits what the core produced
(:func:`announce` makes its records) and knows nothing of training: a
driver asks the core for a window's outcome, hands it here, and only once
it is committed records it in the lineage. Its :class:`CommitState` says whether it may
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
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
)

from schemas import QuarantineRecord, Topics, encode
from trainer.core import Outcome, Trained
from trainer.exceptions import TrainerError
from trainer.kafka import KafkaConnection, kafka_errors
from trainer.lineage import Lineage
from trainer.signing import signed_headers
from trainer.snapshot import snapshot_of

__all__ = [
    "CommitState",
    "Committer",
    "Outgoing",
    "announce",
    "quarantine",
]

log = logging.getLogger(__name__)

TRANSACTION_TIMEOUT_MS = 20_000


class CommitState(enum.Enum):
    NEW = "new"  # not started
    READY = "ready"  # may commit
    IN_TRANSACTION = "in-transaction"  # a commit is under way
    FENCED = "fenced"  # another instance owns the transactional id: never commit again
    FAILED = "failed"  # the driver failed with a window taken out: never commit again
    STOPPED = "stopped"


@dataclass(frozen=True)
class Outgoing:
    """One record to commit: topic, key (an adapter name, or None) and value.

    ``smaller`` are other encodings of the same record, each smaller than the
    last (a quarantine record's bounded forms): when the topic refuses a record
    as too large, the committer writes the next one instead.
    """

    topic: str
    key: str | None
    value: bytes
    smaller: tuple[bytes, ...] = ()

    def step_down(self) -> Outgoing | None:
        if not self.smaller:
            return None
        return replace(self, value=self.smaller[0], smaller=self.smaller[1:])


class _Refused(Exception):
    """The broker refused record ``index`` of a transaction as too large (it was aborted)."""

    def __init__(self, index: int, cause: KafkaError) -> None:
        self.index = index
        self.cause = cause


_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)


class Committer:
    """Commits records and consumer offsets in Kafka transactions, for one transactional id."""

    def __init__(
        self,
        kafka: KafkaConnection,
        transactional_id: str,
        group_id: str | None = None,
        idle_commit_seconds: float = 5.0,
        announce_key: bytes | None = None,
    ) -> None:
        self.kafka = kafka
        self.transactional_id = transactional_id
        # Every record says who wrote it and, with a key, proves it (trainer.signing).
        self.announce_key = announce_key
        self.group_id = group_id
        self.idle_commit_seconds = idle_commit_seconds
        self.state = CommitState.NEW
        self._producer: AIOKafkaProducer | None = None
        self._staged: list[Outgoing] = []
        self._last: dict[TopicPartition, int] = {}
        self._last_at = 0.0

    @property
    def can_commit(self) -> bool:
        return self.state is CommitState.READY

    @property
    def staged(self) -> int:
        return len(self._staged)

    def rename(self, transactional_id: str) -> None:
        """Use ``transactional_id``, known only once the trainer claimed it; before start."""
        if self.state is not CommitState.NEW:
            raise TrainerError(f"{self.transactional_id} is {self.state.value}: too late to rename")
        self.transactional_id = transactional_id

    async def start(self) -> None:
        self._producer = await self._new_producer()
        self.state = CommitState.READY

    async def _new_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            transactional_id=self.transactional_id,
            enable_idempotence=True,
            acks="all",
            # A commit holds its transaction open for well under a second; a writer that dies
            # inside one keeps every read_committed reader (and so a resume) waiting until
            # the broker aborts it, after this long.
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
            **self.kafka.client_kwargs(),
        )
        try:
            with kafka_errors(self.kafka.servers, f"starting {self.transactional_id}"):
                await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

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

    def stage(self, record: Outgoing) -> None:
        """Send ``record`` with the next commit, whatever it is (many quarantined records
        then cost one transaction, and no commit of offsets can pass them unwritten)."""
        self._staged.append(record)

    async def commit(
        self,
        records: Sequence[Outgoing] = (),
        offsets: dict[TopicPartition, int] | None = None,
        inside: Callable[[], None] | None = None,
    ) -> None:
        """Commit the staged records, ``records`` and ``offsets`` in one transaction; ``inside``
        runs before the end (the crash tests fail there, which must abort everything).

        A record the topic refuses as too large is written in its next smaller form, in a
        new transaction; one with none left stops the committer with a one-line reason.
        """
        offsets = offsets or {}
        if self.state is not CommitState.READY or self._producer is None:
            raise TrainerError(
                f"{self.transactional_id} cannot commit: the committer is {self.state.value}"
            )
        if offsets and self.group_id is None:
            raise TrainerError("offsets can only be committed for a consumer group")
        pending = [*self._staged, *records]
        while True:
            try:
                await self._transact(pending, offsets, inside)
                break
            except _Refused as refused:
                record = pending[refused.index]
                smaller = record.step_down()
                if smaller is None:
                    self.state = CommitState.FAILED
                    raise TrainerError(
                        f"{record.topic} refuses a record of {len(record.value)} bytes, the "
                        f"smallest form lorastream can write ({refused.cause!r}); raise the "
                        "topic's max.message.bytes"
                    ) from refused.cause
                log.warning(
                    "%s refused a %d-byte record (%s); writing its %d-byte bounded form",
                    record.topic,
                    len(record.value),
                    type(refused.cause).__name__,
                    len(smaller.value),
                )
                pending[refused.index] = smaller
                # The refused batch used up a sequence number that aiokafka does not take
                # back after the abort (the next send would be OutOfOrderSequenceNumber); a
                # new producer under the same transactional id starts a fresh epoch.
                assert self._producer is not None
                await self._producer.stop()
                self._producer = None
                try:
                    self._producer = await self._new_producer()
                except BaseException:
                    self.state = CommitState.FAILED
                    raise
        self._staged.clear()
        self._last.update(offsets)
        self._last_at = asyncio.get_running_loop().time()

    async def _transact(
        self,
        records: list[Outgoing],
        offsets: dict[TopicPartition, int],
        inside: Callable[[], None] | None,
    ) -> None:
        producer = self._producer
        assert producer is not None
        topic = records[-1].topic if records else "the consumer offsets"
        self.state = CommitState.IN_TRANSACTION
        try:
            async with producer.transaction():
                for index, record in enumerate(records):
                    key = record.key.encode() if record.key is not None else None
                    headers = signed_headers(
                        self.transactional_id, self.announce_key, key, record.value
                    )
                    try:
                        sent = await producer.send(
                            record.topic, key=key, value=record.value, headers=headers
                        )
                        await sent
                    except _TOO_LARGE as exc:
                        raise _Refused(index, exc) from exc
                if inside is not None:
                    inside()
                if offsets:
                    await producer.send_offsets_to_transaction(offsets, self.group_id)
        except _Refused:
            self.state = CommitState.READY  # aborted whole: nothing of it was committed
            raise
        except ProducerFenced as exc:
            self.state = CommitState.FENCED
            _quiet_fenced_futures(asyncio.get_running_loop())
            raise TrainerError(
                f"another instance took over transactional id {self.transactional_id}; this "
                "one stops (give each trainer its own LORASTREAM_INSTANCE_ID, or leave it "
                "unset: each trainer then takes a free one)"
            ) from exc
        except KafkaError as exc:
            self.state = CommitState.FAILED
            raise TrainerError(f"the Kafka transaction on {topic} failed: {exc!r}") from exc
        except BaseException:
            self.state = CommitState.FAILED
            raise
        self.state = CommitState.READY

    async def commit_offsets(self, offsets: dict[TopicPartition, int], force: bool = False) -> None:
        """An offsets-only transaction (with what is staged), when offsets moved and a while
        has passed, or ``force``, or records are staged."""
        moved = {tp: o for tp, o in offsets.items() if self._last.get(tp) != o}
        now = asyncio.get_running_loop().time()
        due = force or self._staged or now - self._last_at >= self.idle_commit_seconds
        if (moved or self._staged) and due:
            await self.commit((), moved)


def _quiet_fenced_futures(loop: asyncio.AbstractEventLoop) -> None:
    """Keep the fencing to the one line the committer raises.

    aiokafka fails futures of its own with the ProducerFenced it raised here (its
    transaction waiter, each batch's drain waiter) and awaits none of them: asyncio would
    print each as "Future exception was never retrieved" with a traceback once collected,
    after the process has said why it stops. Those alone are dropped; anything else still
    reaches the handler that was there.
    """
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        unretrieved = context.get("message") == "Future exception was never retrieved"
        if unretrieved and isinstance(context.get("exception"), ProducerFenced):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def announce(outcome: Outcome, lineage: Lineage, topics: Topics) -> list[Outgoing]:
    """The records that commit ``outcome`` of ``lineage``'s next window: its AdapterUpdate
    and the lineage's new snapshot (one transaction keeps them together), or its
    quarantine record. ``lineage`` itself is not changed."""
    if isinstance(outcome, Trained):
        snapshot = snapshot_of(lineage, outcome.update)
        return [
            Outgoing(topics.adapter_updates, outcome.update.adapter, encode(outcome.update)),
            Outgoing(topics.adapter_latest, lineage.adapter, encode(snapshot)),
        ]
    return [quarantine(outcome, topics)]


def quarantine(record: QuarantineRecord, topics: Topics) -> Outgoing:
    """A quarantine record, as large as the limits allow, with its bounded forms to fall to."""
    largest, *smaller = record.encodings()
    return Outgoing(topics.quarantine, record.adapter, largest, tuple(smaller))
