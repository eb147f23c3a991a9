"""Writing the agent's outputs so that no record goes nowhere.

Every send's delivery is awaited: a record counts as handled only once the
broker has acknowledged what was written for it. A batch of records has all
its outputs in flight at once (:meth:`Writer.write_many`), and is handled
when every one of them is acknowledged. A failure the broker may
get over (a leader moving, a timeout) is retried with a growing pause; a
LearningEvent the broker will not take (too large, or any other refusal)
becomes the input record's dead letter, naming the refusal; a dead letter
refused for its size is cut (see :meth:`schemas.DeadLetter.cut`) and sent
again. A dead letter is never given up on: see :meth:`Writer.write`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)

from schemas import DeadLetter
from schemas.limits import clip
from streams.metrics import ScoringMetrics
from streams.routing import EventRecord, Output, SourceRecord

__all__ = ["Delivery", "Refusal", "RetryPolicy", "Send", "Start", "Writer", "classify"]

log = logging.getLogger(__name__)

Send = Callable[[Output], Awaitable[object]]
"""Writes one output and returns once the broker acknowledged it; raises if it did not."""

Start = Callable[[Output], Awaitable[Awaitable[object]]]
Delivery = Awaitable[object] | BaseException | None  # in flight, refused at once, or none
"""Hands one output to the producer and returns its delivery, at once: awaiting the
delivery returns once the broker acknowledged the output, and raises if it did not."""


class Refusal(enum.Enum):
    """Why a send failed, as far as what to do next is concerned."""

    TOO_LARGE = "too large"  # the same record will never be taken
    RETRIABLE = "retriable"  # the same record may be taken a moment later
    FATAL = "fatal"  # anything else: retrying the same record is not expected to help


def classify(exc: BaseException) -> Refusal:
    """What a send's exception means, looking through the errors that wrap Kafka's own."""
    for error in _causes(exc):
        if isinstance(error, MessageSizeTooLargeError | RecordListTooLargeError):
            return Refusal.TOO_LARGE
        if isinstance(error, KafkaError) and (
            error.retriable or isinstance(error, KafkaTimeoutError)
        ):
            return Refusal.RETRIABLE
    return Refusal.FATAL


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


@dataclass(frozen=True)
class RetryPolicy:
    """How often to try one send, and how long to wait between tries."""

    tries: int = 4
    first_pause: float = 0.1
    max_pause: float = 5.0

    def __post_init__(self) -> None:
        if self.tries < 1:
            raise ValueError(f"tries must be at least 1, not {self.tries}")
        if not 0 <= self.first_pause <= self.max_pause:
            raise ValueError("pauses must satisfy 0 <= first_pause <= max_pause")

    def pause(self, attempt: int) -> float:
        """The pause after failed try number ``attempt`` (1, 2 …): doubling, capped."""
        return min(self.max_pause, self.first_pause * 2 ** (attempt - 1))


class Writer:
    """Writes what :func:`streams.routing.route` decided, until the broker has it."""

    def __init__(
        self,
        send: Send,
        *,
        events_topic: str = "learning-events",
        policy: RetryPolicy | None = None,
        metrics: ScoringMetrics | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        start: Start | None = None,
    ) -> None:
        self._send = send
        self._start = start
        self._events_topic = events_topic
        self._policy = policy or RetryPolicy()
        self._metrics = metrics
        self._sleep = sleep

    async def write(self, record: SourceRecord, output: Output) -> Output:
        """Write ``output`` for ``record``; return what was written once the broker has it.

        That is ``output`` itself, or the record's dead letter when the broker
        refused its LearningEvent. This returns only after something for
        ``record`` is on a topic.
        """
        if isinstance(output, EventRecord):
            failed = await self._try(output)
            if failed is None:
                return output
            return await self._refused(record, failed)
        return await self._write_dead_letter(record, output)

    async def _refused(self, record: SourceRecord, failed: BaseException) -> DeadLetter:
        """The dead letter of a record whose LearningEvent the broker refused, written."""
        letter = record.dead_letter(
            f"the LearningEvent of the GenerationResult at {record.position} could not "
            f"be written to {self._events_topic}: {_describe(failed)}"
        )
        return await self._write_dead_letter(record, letter)

    async def write_many(
        self, items: Sequence[tuple[SourceRecord, Output | None]]
    ) -> list[Output | None]:
        """Write each record's output (None: nothing to write); return, per record, what
        was written for it, once the broker has all of it.

        The outputs go to the producer in order, none waiting for the one before (with
        ``start``; without it, one after the other as :meth:`write`). Then every delivery
        is awaited, and an output whose delivery failed is written again, alone and in
        order, as :meth:`write` writes one: retried, or its record's dead letter. Alone,
        because the broker refuses a producer's whole batch for one record in it too large
        for the topic: its neighbours are fine on their own. So a batch returns
        only after something for each of its records is on a topic, as one record does.
        The producer keeps each partition's order; an output that failed and was written
        again can land after a later one of the same key, which the first try had not.
        """
        return await self.settle(items, await self.start_many(items))

    async def start_many(
        self, items: Sequence[tuple[SourceRecord, Output | None]]
    ) -> list[Delivery]:
        """Hand every output to the producer, in order, awaiting none of their deliveries
        (without ``start``: nothing is handed over, and :meth:`settle` writes each)."""
        deliveries: list[Delivery] = []
        for _, output in items:
            if output is None or self._start is None:
                deliveries.append(None)
                continue
            try:
                deliveries.append(await self._start(output))
            except Exception as exc:  # refused before it left (too large, a closed producer)
                deliveries.append(exc)
        return deliveries

    async def settle(
        self, items: Sequence[tuple[SourceRecord, Output | None]], deliveries: Sequence[Delivery]
    ) -> list[Output | None]:
        """Await the deliveries :meth:`start_many` returned for ``items``; write again what
        failed (see :meth:`write_many`); return what was written for each record."""
        if self._start is None:
            return [None if out is None else await self.write(rec, out) for rec, out in items]
        in_flight = [d for d in deliveries if d is not None and not isinstance(d, BaseException)]
        settled = iter(await asyncio.gather(*in_flight, return_exceptions=True))
        written: list[Output | None] = []
        for (record, output), delivery in zip(items, deliveries, strict=True):
            if output is None or delivery is None:
                written.append(None)
                continue
            outcome = delivery if isinstance(delivery, BaseException) else next(settled)
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if not isinstance(outcome, BaseException):
                written.append(output)
                continue
            log.warning(
                "the output for %s was not delivered (%s); writing it again",
                record.position,
                _describe(outcome),
            )
            written.append(await self.write(record, output))
        return written

    async def _write_dead_letter(self, record: SourceRecord, letter: DeadLetter) -> DeadLetter:
        # Never gives up, and never raises for a refusal. The agent acks a record only once
        # this returns (acks are manual, see app.py), so returning without a letter written
        # would lose the record. Raising would not lose it, but Faust would restart the
        # agent on the next record: this one would wait, unhandled, for the worker's next
        # start, with its partition's committed offset frozen at it while later records are
        # scored (and scored again after that start). Trying until the broker takes the
        # letter stalls the worker instead, visibly (a log line a round, consumer lag), and
        # it recovers by itself; a worker stopped meanwhile has not acked the record, so
        # whoever owns the partition next reads it again.
        rounds = 0
        while True:
            failed = await self._try(letter)
            if failed is None:
                return letter
            if classify(failed) is Refusal.TOO_LARGE and not letter.truncated:
                letter = letter.cut()
                if letter.truncated:
                    continue
            rounds += 1
            pause = self._policy.max_pause
            log.error(
                "the dead letter of %s could not be written (round %d): %s; "
                "retrying in %.1f s, nothing is acknowledged until it is written",
                record.position,
                rounds,
                _describe(failed),
                pause,
            )
            await self._sleep(pause)

    async def _try(self, output: Output) -> Exception | None:
        """Send ``output``, retrying what may pass later; None once sent, else the last error."""
        policy = self._policy
        for attempt in range(1, policy.tries + 1):
            try:
                await self._send(output)
                return None
            except Exception as exc:
                if classify(exc) is not Refusal.RETRIABLE or attempt == policy.tries:
                    return exc
                if self._metrics is not None:
                    self._metrics.send_retries.inc()
                pause = policy.pause(attempt)
                log.warning(
                    "send failed (%s); try %d again in %.2f s", _describe(exc), attempt + 1, pause
                )
                await self._sleep(pause)
        raise AssertionError("unreachable: the last try returns")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {clip(str(exc), 500)}"
