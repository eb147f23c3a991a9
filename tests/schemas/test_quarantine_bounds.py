"""A quarantine record is bounded whatever it holds: its bounded forms, and the schema file."""

from __future__ import annotations

import base64
import hashlib

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from lorastream.dev.events import learning_event
from schemas import QuarantineRecord, SourcePosition, WindowSpec, decode, encode
from schemas.limits import KEPT_PAYLOAD_BYTES, MAX_OUTPUT_BYTES, MAX_REASON_CHARS
from schemas.resources import SCHEMA_FILES, schema_document


def _validator() -> Draft202012Validator:
    registry = Registry().with_resources(
        (schema_document(name)["$id"], Resource.from_contents(schema_document(name)))
        for name in SCHEMA_FILES
    )
    return Draft202012Validator(schema_document("QuarantineRecord"), registry=registry)


def _window(size: int, text: int) -> QuarantineRecord:
    events = [learning_event("w", n).model_copy(update={"prompt": "p" * text}) for n in range(size)]
    spec = WindowSpec(
        topic="learning-events",
        partition=0,
        first_offset=0,
        last_offset=size - 1,
        size=size,
        event_ids=[e.id for e in events],
    )
    return QuarantineRecord(adapter="w", error="e" * 10_000, tries=3, window=spec, events=events)


def test_a_long_error_is_clipped_with_a_marker() -> None:
    record = _window(1, 10)
    assert len(record.error) == MAX_REASON_CHARS
    assert record.error.endswith("…[truncated] (10000 chars)")


def test_a_window_too_big_falls_to_its_events_left_out() -> None:
    record = _window(16, 80_000)
    full = encode(record)
    assert len(full) > MAX_OUTPUT_BYTES
    forms = record.encodings()
    assert all(len(f) <= MAX_OUTPUT_BYTES for f in forms)
    assert [len(f) for f in forms] == sorted((len(f) for f in forms), reverse=True)
    bounded = decode(forms[0], QuarantineRecord)
    assert bounded.truncated and bounded.events == []
    assert bounded.window == record.window
    assert bounded.original_size == len(full)
    assert bounded.original_sha256 == hashlib.sha256(full).hexdigest()
    assert _validator().is_valid(bounded.model_dump(mode="json"))


@pytest.mark.parametrize("size", [10, KEPT_PAYLOAD_BYTES + 1, 5_000_000])
def test_an_unreadable_record_keeps_its_head_its_size_and_its_hash(size: int) -> None:
    value = bytes(range(256)) * (size // 256 + 1)
    value = value[:size]
    record = QuarantineRecord.bad_record(
        "a", "bad", SourcePosition(topic="learning-events", partition=2, offset=7), value
    )
    forms = record.encodings()
    assert all(len(f) <= MAX_OUTPUT_BYTES for f in forms)
    largest = decode(forms[0], QuarantineRecord)
    kept = base64.b64decode(largest.value_base64 or "")
    if len(encode(record)) <= MAX_OUTPUT_BYTES:
        assert not largest.truncated and kept == value
    else:
        assert largest.truncated and kept == value[:KEPT_PAYLOAD_BYTES]
        assert largest.original_size == size
        assert largest.original_sha256 == hashlib.sha256(value).hexdigest()
    smallest = decode(forms[-1], QuarantineRecord)
    assert smallest.source == record.source
    for form in forms:
        assert _validator().is_valid(decode(form, QuarantineRecord).model_dump(mode="json"))


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"truncated": True}, "original_size and original_sha256 are required"),
        ({"original_size": 5}, "describe a truncated record only"),
    ],
)
def test_truncation_fields_go_together(changes: dict[str, object], needle: str) -> None:
    doc = {**encode_doc(), **changes}
    with pytest.raises(Exception, match=needle):
        QuarantineRecord.model_validate(doc)


def encode_doc() -> dict[str, object]:
    record = QuarantineRecord.bad_record(
        "a", "bad", SourcePosition(topic="t", partition=0, offset=1), b"x"
    )
    return record.model_dump(mode="json")
