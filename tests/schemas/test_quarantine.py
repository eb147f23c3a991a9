"""The quarantine record: which records it refuses, and exact round trips."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from schemas import QuarantineRecord, SchemaError, SourcePosition, decode, encode
from tests.schemas.cases import QUARANTINE_ACCEPTS, QUARANTINE_REJECTS, quarantined_window


@pytest.mark.parametrize(
    ("doc", "field"), [pytest.param(d, f, id=i) for i, d, f in QUARANTINE_REJECTS]
)
def test_quarantine_record_rejects_and_names_the_field(doc: Any, field: str) -> None:
    with pytest.raises(SchemaError) as info:
        decode(orjson.dumps(doc), QuarantineRecord)
    assert field in [f for f, _ in info.value.problems], info.value.problems
    assert str(info.value).startswith("invalid QuarantineRecord: ")


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        pytest.param(
            quarantined_window(source={"topic": "t", "partition": 0, "offset": 1}),
            "window and source are both set",
            id="both",
        ),
        pytest.param(
            quarantined_window(window=None, events=[]),
            "neither window nor source is set",
            id="neither",
        ),
        pytest.param(quarantined_window(tries=0), "tries is 0", id="window-untried"),
        pytest.param(
            quarantined_window(events=quarantined_window()["events"][::-1]),
            "events[0].id is 'e-2' but window.event_ids[0] is 'e-1'",
            id="events-out-of-order",
        ),
    ],
)
def test_cross_field_errors_name_the_fields(doc: dict[str, Any], needle: str) -> None:
    with pytest.raises(SchemaError) as info:
        decode(orjson.dumps(doc), QuarantineRecord)
    assert needle in str(info.value)


@pytest.mark.parametrize(("doc",), [pytest.param(d, id=i) for i, d in QUARANTINE_ACCEPTS])
def test_quarantine_record_accepts_and_round_trips(doc: dict[str, Any]) -> None:
    record = decode(orjson.dumps(doc), QuarantineRecord)
    assert decode(encode(record), QuarantineRecord) == record
    assert encode(decode(encode(record), QuarantineRecord)) == encode(record)


@pytest.mark.parametrize(
    "value",
    [b'{"id": "broken", ', b"", b"\xff\x00\xfe", None],
    ids=["json", "empty", "binary", "tombstone"],
)
def test_bad_record_keeps_the_bytes_and_round_trips(value: bytes | None) -> None:
    source = SourcePosition(topic="learning-events", partition=2, offset=9)
    record = QuarantineRecord.bad_record("a1", "not valid JSON", source, value)
    assert (record.tries, record.window, record.events, record.source) == (0, None, [], source)
    kept = None if record.value_base64 is None else base64.b64decode(record.value_base64)
    assert kept == value
    assert decode(encode(record), QuarantineRecord) == record


def test_created_at_defaults_to_now_in_utc() -> None:
    before = datetime.now(tz=UTC)
    record = QuarantineRecord.bad_record(
        None, "e", SourcePosition(topic="t", partition=0, offset=0), None
    )
    assert before <= record.created_at <= datetime.now(tz=UTC)
    assert record.created_at.utcoffset() is not None
    assert b'"created_at":"' in encode(record) and encode(record).count(b'Z"') == 1


def test_a_window_round_trips_with_its_events() -> None:
    record = decode(orjson.dumps(quarantined_window()), QuarantineRecord)
    assert [event.id for event in record.events] == ["e-1", "e-2"]
    assert record.window is not None and record.window.event_ids == ["e-1", "e-2"]
    assert decode(encode(record), QuarantineRecord) == record
