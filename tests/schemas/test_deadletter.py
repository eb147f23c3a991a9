"""The dead letter: what is written, what is read back, what is refused, and its bounds."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import pytest

from schemas import (
    DeadLetter,
    DeadLetterHeaders,
    GenerationResult,
    KafkaPosition,
    SchemaError,
    dead_letter_headers,
    decode,
    read_dead_letter_headers,
)
from schemas.limits import KEPT_PAYLOAD_BYTES, MAX_OUTPUT_BYTES, MAX_REASON_CHARS, TRUNCATION_MARKER
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


def _letter(key: bytes | None, value: bytes | None, **options: Any) -> DeadLetter:
    return DeadLetter.refusing(_refusal(), key, value, POSITION, 7, **options)


def test_a_dead_letter_under_the_bound_keeps_the_record_whole() -> None:
    value = b"v" * (MAX_OUTPUT_BYTES - 10_000)
    letter = _letter(b"default", value)
    assert (letter.key, letter.value, letter.truncated) == (b"default", value, False)
    assert letter.headers == dead_letter_headers(_refusal(), POSITION, 7)
    assert letter.size <= MAX_OUTPUT_BYTES
    assert letter.reason == str(_refusal())


@pytest.mark.parametrize(
    ("key", "value", "cut"),
    [
        pytest.param(b"default", b"v" * 5_000_000, {"value"}, id="value"),
        pytest.param(b"k" * 2_000_000, b"{}", {"key"}, id="key"),
        pytest.param(b"k" * 600_000, b"v" * 600_000, {"key", "value"}, id="both"),
        pytest.param(None, b"v" * MAX_OUTPUT_BYTES, {"value"}, id="no-key"),
    ],
)
def test_a_dead_letter_over_the_bound_keeps_the_head_and_says_what_was_cut(
    key: bytes | None, value: bytes, cut: set[str]
) -> None:
    letter = _letter(key, value)
    assert letter.truncated and letter.size <= MAX_OUTPUT_BYTES
    headers = DeadLetterHeaders.from_kafka(letter.headers)
    assert headers.truncated and headers.source_offset == POSITION.offset
    for part, original, kept in (("key", key, letter.key), ("value", value, letter.value)):
        if part in cut:
            assert original is not None
            assert kept == original[:KEPT_PAYLOAD_BYTES]
            assert getattr(headers, f"{part}_size") == len(original)
            assert getattr(headers, f"{part}_sha256") == hashlib.sha256(original).hexdigest()
        else:
            assert kept == original and getattr(headers, f"{part}_size") is None
    assert letter.cut() == letter


def test_limit_0_cuts_whatever_is_longer_than_what_is_kept() -> None:
    value = b"v" * (KEPT_PAYLOAD_BYTES + 1)
    assert _letter(b"k", value, limit=0).value == value[:KEPT_PAYLOAD_BYTES]
    small = _letter(b"k", b"v" * KEPT_PAYLOAD_BYTES, limit=0)
    assert not small.truncated and small.value == b"v" * KEPT_PAYLOAD_BYTES


def test_a_dead_letter_clips_its_reason_and_fields_whatever_their_length() -> None:
    letter = DeadLetter.of(
        b"k",
        b"v",
        POSITION,
        None,
        reason="r" * 1_000_000,
        error_type="GenerationResult",
        fields=[f"field{i}" for i in range(100_000)],
    )
    headers = DeadLetterHeaders.from_kafka(letter.headers)
    assert len(headers.error) == len(headers.fields) == MAX_REASON_CHARS
    assert headers.error.endswith(f"{TRUNCATION_MARKER} (1000000 chars)")
    assert letter.size < 20_000


def test_the_reason_of_a_refused_huge_value_is_short() -> None:
    with pytest.raises(SchemaError) as info:
        decode(
            orjson.dumps({"id": "a", "adapter": "x" * 600_000, "prompt": "", "response": ""}),
            GenerationResult,
            position=POSITION,
        )
    letter = DeadLetter.refusing(info.value, b"default", b"{}", POSITION, None)
    assert len(letter.reason) < 500 and TRUNCATION_MARKER in letter.reason
