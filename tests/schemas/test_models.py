"""Every rejection case of the wire contract, and exact round trips."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from schemas import (
    AdapterUpdate,
    GenerationResult,
    KafkaPosition,
    LearningEvent,
    SchemaError,
    decode,
    encode,
)
from tests.schemas.cases import GENERATION_ACCEPTS, GENERATION_REJECTS, gen


@pytest.mark.parametrize(
    ("doc", "field"), [pytest.param(d, f, id=i) for i, d, f in GENERATION_REJECTS]
)
def test_generation_result_rejects_and_names_the_field(doc: Any, field: str) -> None:
    with pytest.raises(SchemaError) as info:
        decode(orjson.dumps(doc), GenerationResult)
    fields = [f for f, _ in info.value.problems]
    assert field in fields, info.value.problems
    assert str(info.value).startswith("invalid GenerationResult: ")
    assert all(message for _, message in info.value.problems)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        pytest.param(b"{not json", "not valid JSON", id="bad-json"),
        pytest.param(b'{"id": "a", "entropy_delta": NaN}', "not valid JSON", id="nan-literal"),
        pytest.param(b'{"id": "a", "entropy_delta": 1e400}', "infinity", id="infinite-number"),
        pytest.param(b"\xff\xfe{}", "UTF-8", id="bad-utf8"),
        pytest.param(b'{"id": "\\ud800"}', "surrogate", id="lone-surrogate"),
        pytest.param(b"", "not valid JSON", id="empty"),
        pytest.param(None, "tombstone", id="tombstone"),
    ],
)
def test_undecodable_bytes_are_rejected_with_the_reason(raw: bytes | None, needle: str) -> None:
    with pytest.raises(SchemaError) as info:
        decode(raw, GenerationResult)
    assert needle in str(info.value)


def test_errors_carry_the_kafka_position_and_the_file_line() -> None:
    raw = orjson.dumps(gen(adapter="../x"))
    with pytest.raises(SchemaError) as info:
        decode(raw, GenerationResult, position=KafkaPosition("generation-results", 2, 41))
    assert "generation-results[2]@41" in str(info.value)
    assert info.value.position is not None and info.value.position.offset == 41
    with pytest.raises(SchemaError, match="on line 7"):
        decode(raw, GenerationResult, line=7)


@pytest.mark.parametrize(("doc",), [pytest.param(d, id=i) for i, d in GENERATION_ACCEPTS])
def test_generation_result_accepts_and_round_trips(doc: dict[str, Any]) -> None:
    result = decode(orjson.dumps(doc), GenerationResult)
    assert decode(encode(result), GenerationResult) == result
    for key, value in doc.items():
        if key != "created_at":
            assert getattr(result, key) == value


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"entropy_delta": -0.3}, -0.3),
        ({"entropy_delta": None, "entropy_before": 2.0, "entropy_after": 1.5}, -0.5),
        ({"entropy_delta": 0.2, "entropy_before": 2.0, "entropy_after": 1.5}, 0.2),
    ],
    ids=["given", "computed-from-pair", "given-wins-over-pair"],
)
def test_effective_entropy_delta(changes: dict[str, Any], expected: float) -> None:
    assert GenerationResult.model_validate(gen(**changes)).effective_entropy_delta == expected


def test_adapter_defaults_to_default() -> None:
    assert decode(orjson.dumps(gen()), GenerationResult).adapter == "default"


def _learning_event(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "r-1",
        "adapter": "a1",
        "prompt": "p",
        "response": "r",
        "baseline": None,
        "rouge_score": 0.5,
        "entropy_delta": -0.2,
        "is_breakthrough": False,
        "timestamp": "2026-01-31T12:00:00Z",
        "source": {"topic": "generation-results", "partition": 0, "offset": 12},
    }
    doc.update(changes)
    return doc


def _adapter_update(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "adapter": "a1",
        "version": 2,
        "parent_version": 1,
        "base_model": "/models/tiny-llama",
        "uri": "file:///tmp/adapters/a1/v2",
        "sha256": "ab" * 32,
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "window": {
            "topic": "learning-events",
            "partition": 0,
            "first_offset": 16,
            "last_offset": 31,
            "size": 2,
            "event_ids": ["a", "b"],
        },
        "train_loss": 5.25,
        "created_at": "2026-01-31T12:00:00Z",
    }
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (_learning_event(rouge_score=1.5), "rouge_score"),
        (_learning_event(is_breakthrough="yes"), "is_breakthrough"),
        (_learning_event(source={"topic": "t", "partition": 0}), "source.offset"),
        (_learning_event(source={"topic": "t", "partition": -1, "offset": 0}), "source.partition"),
        (_learning_event(timestamp="noon"), "timestamp"),
        (_learning_event(adapter="a b"), "adapter"),
    ],
    ids=[
        "rouge-above-1",
        "flag-not-bool",
        "source-offset-missing",
        "negative-partition",
        "bad-timestamp",
        "bad-adapter",
    ],
)
def test_learning_event_rejects(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(SchemaError) as info:
        decode(orjson.dumps(doc), LearningEvent)
    assert field in [f for f, _ in info.value.problems]


def test_learning_event_tolerates_fields_of_newer_writers() -> None:
    event = decode(orjson.dumps(_learning_event(added_later=1)), LearningEvent)
    assert event.id == "r-1"


def test_learning_event_round_trips() -> None:
    event = decode(orjson.dumps(_learning_event(metadata={"k": [1, {"x": None}]})), LearningEvent)
    assert event.timestamp == datetime(2026, 1, 31, 12, tzinfo=UTC)
    assert decode(encode(event), LearningEvent) == event
    assert b'"timestamp":"2026-01-31T12:00:00Z"' in encode(event)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (_adapter_update(version=0, parent_version=None), "version"),
        (_adapter_update(parent_version=None), "$"),
        (_adapter_update(version=1, parent_version=1), "$"),
        (_adapter_update(sha256="XYZ"), "sha256"),
        (_adapter_update(format="pickle"), "format"),
        (_adapter_update(train_loss=None), "train_loss"),
        (_adapter_update(window={**_adapter_update()["window"], "size": 3}), "window"),
        (_adapter_update(window={**_adapter_update()["window"], "last_offset": 1}), "window"),
        (_adapter_update(lora={"r": 0, "alpha": 16, "target_modules": []}), "lora.r"),
    ],
    ids=[
        "version-0",
        "v2-without-parent",
        "v1-with-parent",
        "bad-sha",
        "not-peft",
        "loss-null",
        "size-mismatch",
        "offsets-reversed",
        "rank-0",
    ],
)
def test_adapter_update_rejects(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(SchemaError) as info:
        decode(orjson.dumps(doc), AdapterUpdate)
    assert field in [f for f, _ in info.value.problems]


def test_adapter_update_round_trips() -> None:
    update = decode(orjson.dumps(_adapter_update()), AdapterUpdate)
    assert decode(encode(update), AdapterUpdate) == update
    first = decode(orjson.dumps(_adapter_update(version=1, parent_version=None)), AdapterUpdate)
    assert first.parent_version is None


def _grouped(group: Any) -> bytes:
    doc = _adapter_update()
    doc["window"] = {**doc["window"], "group": group}
    return orjson.dumps(doc)


def test_a_windows_group_names_its_adapters_and_their_rows_and_older_records_have_none() -> None:
    """#24: ``window.group`` says which adapters were stepped together and each one's rows
    ([prompt, response] tokens); an announcement from before it decodes with None."""
    assert decode(orjson.dumps(_adapter_update()), AdapterUpdate).window.group is None
    update = decode(
        _grouped({"adapters": ["a1", "b2"], "rows": [[[3, 2]], [[0, 1], [4, 5]]]}), AdapterUpdate
    )
    group = update.window.group
    assert group is not None and group.adapters == ["a1", "b2"]
    assert group.rows == [[(3, 2)], [(0, 1), (4, 5)]]
    assert decode(encode(update), AdapterUpdate) == update
    assert group.named("a1", "a1-again").adapters == ["a1-again", "b2"]


@pytest.mark.parametrize(
    ("group", "said"),
    [
        ({"adapters": ["a1"], "rows": [[[1, 1]]]}, "window.group.adapters"),
        ({"adapters": ["a1", "a1"], "rows": [[[1, 1]], [[1, 1]]]}, "names an adapter twice"),
        ({"adapters": ["a1", "b2"], "rows": [[[1, 1]]]}, "rows has 1 lists for 2 adapters"),
        ({"adapters": ["a1", "b2"], "rows": [[[1, 1]], []]}, "at least one row"),
        ({"adapters": ["a1", "b2"], "rows": [[[1, 0]], [[1, 1]]]}, "window.group.rows.0.0.1"),
        ({"adapters": ["a1", "../b"], "rows": [[[1, 1]], [[1, 1]]]}, "window.group.adapters.1"),
    ],
)
def test_a_bad_group_is_refused_naming_what_is_wrong(group: dict[str, Any], said: str) -> None:
    with pytest.raises(SchemaError, match=re.escape(said)):
        decode(_grouped(group), AdapterUpdate)
