"""Writer: a record returns only once something for it is written; a dead letter is never dropped.

The broker is a fake here, so that every failure can be chosen; the real
broker's refusals are in test_hostile_input.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import orjson
import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)
from faust.exceptions import ProducerSendError

from schemas import DeadLetter, DeadLetterHeaders, KafkaPosition
from schemas.limits import KEPT_PAYLOAD_BYTES
from streams.delivery import Refusal, RetryPolicy, Writer, classify
from streams.metrics import ScoringMetrics
from streams.routing import EventRecord, Output, SourceRecord, route
from streams.scoring import Thresholds

pytestmark = pytest.mark.timeout(10)

POSITION = KafkaPosition("generation-results", 0, 5)
VALUE = orjson.dumps({"id": "r", "prompt": "p", "response": "r", "entropy_delta": 0.5})
RECORD = SourceRecord(b"default", VALUE, POSITION, None)


def _wrapped(error: Exception) -> ProducerSendError:
    """As Faust raises what aiokafka refused before sending."""
    try:
        raise ProducerSendError(f"Error while sending: {error!r}") from error
    except ProducerSendError as exc:
        return exc


@pytest.mark.parametrize(
    ("error", "refusal"),
    [
        (MessageSizeTooLargeError(), Refusal.TOO_LARGE),
        (_wrapped(MessageSizeTooLargeError("The message is 2000000 bytes")), Refusal.TOO_LARGE),
        (RecordListTooLargeError(), Refusal.TOO_LARGE),
        (NotLeaderForPartitionError(), Refusal.RETRIABLE),
        (KafkaTimeoutError(), Refusal.RETRIABLE),
        (_wrapped(KafkaConnectionError()), Refusal.RETRIABLE),
        (TopicAuthorizationFailedError(), Refusal.FATAL),
        (ValueError("a bug"), Refusal.FATAL),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, Exception) else x.name,
)
def test_classify(error: Exception, refusal: Refusal) -> None:
    assert classify(error) is refusal


class FakeBroker:
    """Refuses each send with the next error of ``script`` (None: takes it)."""

    def __init__(self, script: Iterator[Exception | None]) -> None:
        self.script = script
        self.written: list[Output] = []
        self.tries: list[Output] = []
        self.pauses: list[float] = []

    async def send(self, output: Output) -> None:
        self.tries.append(output)
        error = next(self.script)
        if error is not None:
            raise error
        self.written.append(output)

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        if len(self.pauses) > 20:
            raise asyncio.CancelledError  # a worker stopped while the writer waits


def _writer(broker: FakeBroker, metrics: ScoringMetrics | None = None) -> Writer:
    policy = RetryPolicy(tries=3, first_pause=0.1, max_pause=2.0)
    return Writer(broker.send, policy=policy, metrics=metrics, sleep=broker.sleep)


def _event() -> EventRecord:
    output = route(RECORD, Thresholds()).output
    assert isinstance(output, EventRecord)
    return output


def _errors(*errors: Exception | None, then: Exception | None = None) -> Iterator[Exception | None]:
    yield from errors
    while True:
        yield then


async def test_an_event_taken_at_once_is_written_once() -> None:
    broker = FakeBroker(_errors())
    event = _event()
    assert await _writer(broker).write(RECORD, event) is event
    assert broker.written == [event] and broker.pauses == []


async def test_a_retriable_failure_is_tried_again_after_growing_pauses() -> None:
    broker = FakeBroker(_errors(NotLeaderForPartitionError(), KafkaTimeoutError()))
    metrics = ScoringMetrics()
    event = _event()
    assert await _writer(broker, metrics).write(RECORD, event) is event
    assert broker.tries == [event, event, event] and broker.written == [event]
    assert broker.pauses == [0.1, 0.2]
    assert metrics.send_retries._value.get() == 2


@pytest.mark.parametrize(
    ("errors", "needle"),
    [
        ([_wrapped(MessageSizeTooLargeError("too big"))], "MessageSizeTooLargeError"),
        ([TopicAuthorizationFailedError()], "TopicAuthorizationFailedError"),
        ([KafkaTimeoutError()] * 3, "KafkaTimeoutError"),
    ],
    ids=["too-large", "fatal", "retriable-until-the-last-try"],
)
async def test_an_event_the_broker_will_not_take_becomes_a_dead_letter(
    errors: list[Exception], needle: str
) -> None:
    broker = FakeBroker(_errors(*errors))
    written = await _writer(broker).write(RECORD, _event())
    assert isinstance(written, DeadLetter) and broker.written == [written]
    assert (written.key, written.value) == (b"default", VALUE)
    headers = DeadLetterHeaders.from_kafka(written.headers)
    assert "LearningEvent of the GenerationResult at generation-results[0]@5" in headers.error
    assert needle in headers.error and headers.fields == "$"


async def test_a_dead_letter_refused_for_its_size_is_cut_and_sent_again() -> None:
    broker = FakeBroker(_errors(MessageSizeTooLargeError()))
    value = b"{" + b"x" * 300_000
    letter = route(SourceRecord(b"k", value, POSITION, None), Thresholds()).output
    assert isinstance(letter, DeadLetter) and not letter.truncated
    written = await _writer(broker).write(RECORD, letter)
    assert isinstance(written, DeadLetter) and written.truncated
    assert written.value == value[:KEPT_PAYLOAD_BYTES] and broker.written == [written]


async def test_a_dead_letter_is_never_given_up_on() -> None:
    # The broker refuses everything; the writer keeps trying and never returns, so the
    # record is never acknowledged. Only stopping the worker (a cancellation) ends it.
    broker = FakeBroker(_errors(then=TopicAuthorizationFailedError()))
    with pytest.raises(asyncio.CancelledError):
        await _writer(broker).write(RECORD, _event())
    assert broker.written == []
    assert len(broker.tries) > 10
    assert all(isinstance(output, DeadLetter) for output in broker.tries[1:])
    assert set(broker.pauses) == {2.0}  # a round a pause, at the longest


async def test_a_dead_letter_waits_out_a_broker_that_is_away() -> None:
    broker = FakeBroker(_errors(*[KafkaConnectionError()] * 9))
    letter = route(SourceRecord(b"k", b"{", POSITION, None), Thresholds()).output
    assert isinstance(letter, DeadLetter)
    assert await _writer(broker).write(RECORD, letter) == letter
    assert broker.written == [letter] and len(broker.tries) == 10


def test_retry_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="tries"):
        RetryPolicy(tries=0)
    assert [RetryPolicy(first_pause=1, max_pause=3).pause(n) for n in (1, 2, 3)] == [1, 2, 3]


class PipelinedBroker(FakeBroker):
    """Takes outputs at once and settles each delivery a moment later, as a producer does;
    remembers how many outputs it had taken when it settled the first delivery."""

    def __init__(self, script: Iterator[Exception | None]) -> None:
        super().__init__(script)
        self.taken_when_first_settled: int | None = None

    async def start(self, output: Output) -> asyncio.Future[None]:
        self.tries.append(output)
        error = next(self.script)
        delivery: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settle() -> None:
            if self.taken_when_first_settled is None:
                self.taken_when_first_settled = len(self.tries)
            if error is None:
                self.written.append(output)
                delivery.set_result(None)
            else:
                delivery.set_exception(error)

        asyncio.get_running_loop().call_soon(settle)
        return delivery


def _record(offset: int, delta: float = 0.5) -> SourceRecord:
    value = orjson.dumps(
        {"id": f"r{offset}", "prompt": "p", "response": "r", "entropy_delta": delta}
    )
    return SourceRecord(b"default", value, KafkaPosition("generation-results", 0, offset), None)


async def test_a_batch_has_every_output_in_flight_before_any_is_acknowledged() -> None:
    broker = PipelinedBroker(_errors())
    writer = Writer(broker.send, start=broker.start, sleep=broker.sleep)
    records = [_record(i, delta=0.5 if i % 3 else 0.0) for i in range(9)]  # every third: none
    items = [(r, route(r, Thresholds()).output) for r in records]
    written = await writer.write_many(items)
    assert written == [out for _, out in items]
    assert [w is None for w in written] == [i % 3 == 0 for i in range(9)]
    assert broker.written == [out for _, out in items if out is not None]
    assert broker.taken_when_first_settled == 6  # all six were taken before the first ack


async def test_a_failed_delivery_in_a_batch_is_written_again_alone_in_order() -> None:
    # Deliveries: the 2nd times out; the 3rd and the 4th are refused as too large, as the
    # broker refuses a whole producer batch for one record in it. Alone, the 2nd and the
    # 4th are taken and the 3rd is too large again: only it becomes a dead letter.
    big = _wrapped(MessageSizeTooLargeError("big"))
    broker = PipelinedBroker(_errors(None, KafkaTimeoutError(), big, big, None, big, None, None))
    writer = Writer(broker.send, start=broker.start, sleep=broker.sleep)
    records = [_record(i) for i in range(4)]
    events = [route(r, Thresholds()).output for r in records]
    written = await writer.write_many(list(zip(records, events, strict=True)))
    assert written[0] is events[0] and written[1] is events[1] and written[3] is events[3]
    assert isinstance(written[2], DeadLetter) and written[2].value == records[2].value
    assert "MessageSizeTooLargeError" in DeadLetterHeaders.from_kafka(written[2].headers).error
    # The first tries of all four, then each failed one again, alone, in order.
    assert broker.tries[:4] == events
    assert broker.tries[4:] == [events[1], events[2], written[2], events[3]]
    assert broker.written == [events[0], events[1], written[2], events[3]]
