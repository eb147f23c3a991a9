"""route(): every record becomes a LearningEvent, a bounded dead letter, or a definite nothing."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

import streams.routing
from schemas import DeadLetter, DeadLetterHeaders, KafkaPosition, LearningEvent, decode
from schemas.limits import KEPT_PAYLOAD_BYTES, MAX_OUTPUT_BYTES
from streams.routing import EventRecord, SourceRecord, route
from streams.scoring import Thresholds

POSITION = KafkaPosition("generation-results", 1, 99)


def _record(value: bytes | None, key: bytes | None = b"default") -> SourceRecord:
    return SourceRecord(key=key, value=value, position=POSITION, timestamp_ms=1_700_000_000_000)


def _doc(**fields: Any) -> bytes:
    return orjson.dumps({"id": "r", "prompt": "p", "response": "r", **fields})


def test_a_qualifying_result_becomes_its_encoded_learning_event() -> None:
    routing = route(_record(_doc(adapter="tutor", entropy_delta=0.5)), Thresholds())
    assert isinstance(routing.output, EventRecord) and routing.failure is None
    assert routing.output.key == b"tutor"
    assert decode(routing.output.value, LearningEvent) == routing.output.event


def test_a_result_that_does_not_qualify_becomes_nothing() -> None:
    routing = route(_record(_doc(entropy_delta=0.01)), Thresholds())
    assert routing.output is None and routing.outcome is not None
    assert routing.outcome.error is None


@pytest.mark.parametrize(
    "value", [None, b"{", orjson.dumps({"id": "r"})], ids=["tombstone", "bad-json", "invalid"]
)
def test_a_broken_record_becomes_its_dead_letter(value: bytes | None) -> None:
    routing = route(_record(value), Thresholds())
    assert isinstance(routing.output, DeadLetter)
    assert routing.output.value == value and routing.output.key == b"default"
    assert DeadLetterHeaders.from_kafka(routing.output.headers).source_offset == 99


def test_a_huge_broken_record_becomes_a_bounded_dead_letter() -> None:
    value = b'{"id": "' + b"x" * 3_000_000
    routing = route(_record(value), Thresholds())
    assert isinstance(routing.output, DeadLetter)
    assert routing.output.truncated and routing.output.size <= MAX_OUTPUT_BYTES
    assert routing.output.value == value[:KEPT_PAYLOAD_BYTES]


def test_an_exception_while_scoring_becomes_a_dead_letter_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any) -> Any:
        raise TypeError("Recursion limit reached")

    monkeypatch.setattr(streams.routing, "process", broken)
    value = _doc(entropy_delta=0.5)
    routing = route(_record(value), Thresholds())
    assert isinstance(routing.output, DeadLetter) and routing.outcome is None
    assert routing.failure is not None
    assert routing.failure.startswith("unexpected TypeError: Recursion limit reached (")
    assert "streams/test_routing.py:" in routing.failure  # where it was raised
    headers = DeadLetterHeaders.from_kafka(routing.output.headers)
    assert headers.fields == "$" and headers.error_type == "GenerationResult"
    assert "could not be scored: unexpected TypeError: Recursion limit reached" in headers.error
    assert f"{POSITION}" in headers.error
    assert routing.output.value == value


def test_a_learning_event_too_large_for_kafka_becomes_a_dead_letter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # MAX_RESULT_BYTES rules this out; the guard behind it is checked with a smaller bound.
    monkeypatch.setattr(streams.routing, "MAX_OUTPUT_BYTES", 300)
    value = _doc(entropy_delta=0.5, response="r" * 400)
    routing = route(_record(value), Thresholds())
    assert isinstance(routing.output, DeadLetter) and routing.failure is None
    assert "LearningEvent" in routing.output.reason and "more than the 300" in routing.output.reason
    assert routing.output.value == value
