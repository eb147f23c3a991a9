"""The dead-letter headers: what is written, what is read back, what is refused."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import (
    DeadLetterHeaders,
    GenerationResult,
    KafkaPosition,
    SchemaError,
    dead_letter_headers,
    decode,
    read_dead_letter_headers,
)
from tests.schemas.cases import DEAD_LETTER_ACCEPTS, DEAD_LETTER_REJECTS

POSITION = KafkaPosition("generation-results", 3, 41)


def _refusal() -> SchemaError:
    with pytest.raises(SchemaError) as info:
        decode(
            b'{"prompt": 1, "response": "r", "entropy_delta": 0}',
            GenerationResult,
            position=POSITION,
        )
    return info.value


def _kafka(doc: dict[str, Any]) -> list[tuple[str, bytes | None]]:
    return [(key, None if value is None else value.encode()) for key, value in doc.items()]


def test_dead_letter_headers_are_written_in_order_as_utf8() -> None:
    error = _refusal()
    assert dead_letter_headers(error, POSITION, 1769860800000) == [
        ("lorastream.error", str(error).encode()),
        ("lorastream.error.type", b"GenerationResult"),
        ("lorastream.fields", b"id,prompt"),
        ("lorastream.source.topic", b"generation-results"),
        ("lorastream.source.partition", b"3"),
        ("lorastream.source.offset", b"41"),
        ("lorastream.source.timestamp", b"1769860800000"),
    ]
    without_timestamp = dead_letter_headers(error, POSITION, None)
    assert [name for name, _ in without_timestamp][-1] == "lorastream.source.offset"


def test_written_headers_read_back_as_the_same_values() -> None:
    error = _refusal()
    headers = DeadLetterHeaders.from_kafka(dead_letter_headers(error, POSITION, 5))
    assert headers == DeadLetterHeaders(
        error=str(error),
        error_type="GenerationResult",
        fields="id,prompt",
        source_topic="generation-results",
        source_partition=3,
        source_offset=41,
        source_timestamp=5,
    )
    assert headers.to_kafka() == dead_letter_headers(error, POSITION, 5)
    assert read_dead_letter_headers(headers.to_kafka())["lorastream.source.offset"] == "41"


@pytest.mark.parametrize(
    ("doc", "header"), [pytest.param(d, h, id=i) for i, d, h in DEAD_LETTER_REJECTS]
)
def test_from_kafka_rejects_and_names_the_header(doc: dict[str, Any], header: str) -> None:
    with pytest.raises(SchemaError) as info:
        DeadLetterHeaders.from_kafka(_kafka(doc))
    assert header in [field for field, _ in info.value.problems], info.value.problems
    assert str(info.value).startswith("invalid DeadLetterHeaders: ")


@pytest.mark.parametrize(("doc",), [pytest.param(d, id=i) for i, d in DEAD_LETTER_ACCEPTS])
def test_from_kafka_accepts_and_round_trips(doc: dict[str, Any]) -> None:
    headers = DeadLetterHeaders.from_kafka(_kafka(doc))
    assert DeadLetterHeaders.from_kafka(headers.to_kafka()) == headers
    ours = {key: value for key, value in doc.items() if key in dict(headers.to_kafka())}
    assert {key: value.decode() for key, value in headers.to_kafka()} == ours


@pytest.mark.parametrize(
    ("headers", "header", "needle"),
    [
        pytest.param(
            [("lorastream.source.offset", b"\xff1")],
            "lorastream.source.offset",
            "not UTF-8",
            id="not-utf8",
        ),
        pytest.param(
            [("lorastream.error", b"a"), ("lorastream.error", b"b")],
            "lorastream.error",
            "more than once",
            id="repeated",
        ),
        pytest.param(
            [("lorastream.fields", None)], "lorastream.fields", "has no value", id="null-value"
        ),
    ],
)
def test_from_kafka_names_headers_that_are_not_text(
    headers: list[tuple[str, bytes | None]], header: str, needle: str
) -> None:
    with pytest.raises(SchemaError) as info:
        DeadLetterHeaders.from_kafka(headers)
    problems = dict(info.value.problems)
    assert needle in problems[header]
    assert problems["lorastream.source.topic"] == "is required"  # every problem, not the first


def test_from_kafka_ignores_headers_that_are_not_ours() -> None:
    error = _refusal()
    headers = [("traceparent", b"\xff\xfe"), *dead_letter_headers(error, POSITION, None)]
    assert DeadLetterHeaders.from_kafka(headers).source_timestamp is None
    assert DeadLetterHeaders.from_kafka(dict(headers)).source_offset == 41


def test_read_dead_letter_headers_is_lenient() -> None:
    read = read_dead_letter_headers(
        [("traceparent", b"x"), ("lorastream.error", b"caf\xc3\xa9 \xff"), ("lorastream.x", None)]
    )
    assert read == {"lorastream.error": "café \ufffd", "lorastream.x": ""}
