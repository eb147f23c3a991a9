"""The contract's bounds: nesting, size, and errors that stay small whatever the input."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from schemas import GenerationResult, KafkaPosition, LearningEvent, SchemaError, decode, encode
from schemas.codec import decode_obj
from schemas.limits import (
    MAX_INPUT_REPR_CHARS,
    MAX_METADATA_DEPTH,
    MAX_OUTPUT_BYTES,
    MAX_PROBLEMS,
    MAX_RESULT_BYTES,
    TRUNCATION_MARKER,
    clip,
    record_size,
)
from streams.scoring import Thresholds, process
from tests.schemas.cases import gen, nested, weighing


def _deep(depth: int) -> bytes:
    """A GenerationResult whose metadata nests ``depth`` objects, as any producer may write it
    (orjson writes no more than 254 levels, json.dumps no more than Python's stack allows)."""
    metadata = b'{"a":' * depth + b"0" + b"}" * depth
    return orjson.dumps(gen())[:-1] + b',"metadata":' + metadata + b"}"


# Under the bound as produced, over it as lorastream writes it (1e15 -> 1000000000000000.0).
SPELT_OUT = (
    b'{"id":"n","prompt":"","response":"","entropy_delta":0.5,"metadata":{"n":['
    + b",".join([b"1e15"] * 100_000)
    + b"]}}"
)
assert len(SPELT_OUT) < MAX_RESULT_BYTES


def _refusal(raw: bytes) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        decode(raw, GenerationResult)
    return info.value


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("short", 10, "short"),
        ("exactly10!", 10, "exactly10!"),
        ("x" * 100, 40, "x" * 16 + f"{TRUNCATION_MARKER} (100 chars)"),
    ],
    ids=["short", "at-limit", "long"],
)
def test_clip_keeps_text_within_the_limit(text: str, limit: int, expected: str) -> None:
    assert clip(text, limit) == expected
    assert len(clip(text, limit)) <= limit


@pytest.mark.parametrize(
    ("key", "value", "headers"),
    [
        (None, None, []),
        (b"k", b"v" * 1000, []),
        (b"k" * 300, b"v" * 900_000, [("lorastream.error", b"e" * 2000)]),
        (None, b"", [(f"h{i}", b"x" * i) for i in range(50)]),
    ],
    ids=["empty", "small", "large", "many-headers"],
)
def test_record_size_never_underestimates_kafka(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
) -> None:
    kafka = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
    assert kafka <= record_size(key, value, headers) <= kafka + 1024


def test_metadata_may_nest_exactly_the_bound() -> None:
    result = decode(orjson.dumps(gen(metadata=nested(MAX_METADATA_DEPTH))), GenerationResult)
    assert result.metadata == nested(MAX_METADATA_DEPTH)
    assert decode(encode(result), GenerationResult) == result


@pytest.mark.parametrize("depth", [MAX_METADATA_DEPTH + 1, 254, 300, 1000])
def test_metadata_nested_deeper_is_refused_naming_the_depth(depth: int) -> None:
    error = _refusal(_deep(depth))
    assert error.problems == [
        (
            "metadata",
            f"nests more than {MAX_METADATA_DEPTH} levels deep (objects and arrays, metadata "
            f"itself being level 1); at most {MAX_METADATA_DEPTH} are allowed",
        )
    ]


def test_metadata_beyond_what_json_parsing_takes_is_refused_too() -> None:
    error = _refusal(_deep(2000))
    assert error.problems[0][0] == "$" and "not valid JSON" in str(error)


def test_metadata_that_contains_itself_is_refused_without_hanging() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(SchemaError) as info:
        decode_obj(gen(metadata=loop), GenerationResult)
    assert info.value.problems[0][0] == "metadata"


def test_a_result_may_weigh_exactly_the_bound() -> None:
    doc = weighing(MAX_RESULT_BYTES)
    result = decode(orjson.dumps(doc), GenerationResult)
    assert len(encode(result)) == MAX_RESULT_BYTES


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(orjson.dumps(weighing(MAX_RESULT_BYTES + 1)), id="one-byte-over"),
        pytest.param(orjson.dumps(gen(prompt="p" * 5_000_000)), id="megabytes"),
        # Under the bound as lorastream writes it, over it as produced.
        pytest.param(
            orjson.dumps(gen(), option=orjson.OPT_INDENT_2)[:-1] + b" " * MAX_RESULT_BYTES + b"}",
            id="padded-with-spaces",
        ),
        pytest.param(SPELT_OUT, id="numbers-spelt-out"),
    ],
)
def test_a_result_over_the_bound_is_refused_as_a_whole(raw: bytes) -> None:
    error = _refusal(raw)
    assert [field for field, _ in error.problems] == ["$"]
    assert f"at most {MAX_RESULT_BYTES} bytes" in str(error)
    assert len(str(error)) < 300


def test_the_bound_holds_for_python_built_results_too() -> None:
    with pytest.raises(SchemaError) as info:
        decode_obj(weighing(MAX_RESULT_BYTES + 1), GenerationResult)
    assert info.value.problems[0][0] == "$"


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"metadata": {"x": object()}}, id="not-json"),
        pytest.param({"metadata": {"n": 2**70}}, id="integer-beyond-64-bits"),
        pytest.param({"prompt": "\ud800"}, id="lone-surrogate"),
    ],
)
def test_a_python_built_result_that_cannot_be_encoded_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(SchemaError) as info:
        decode_obj(gen(**changes), GenerationResult)
    assert "cannot be encoded as JSON" in str(info.value)


def test_every_valid_result_makes_a_learning_event_that_kafka_takes() -> None:
    # The largest result, the deepest metadata and the longest topic name Kafka allows.
    position = KafkaPosition("t" * 249, 2**31 - 1, 2**63 - 1)
    for doc in (weighing(MAX_RESULT_BYTES), gen(metadata=nested(MAX_METADATA_DEPTH))):
        outcome = process(orjson.dumps({**doc, "baseline": ""}), position, 0, Thresholds())
        assert outcome.event is not None, outcome.error
        value = encode(outcome.event)
        assert decode(value, LearningEvent) == outcome.event
        assert record_size(outcome.event.adapter.encode(), value) <= MAX_OUTPUT_BYTES


def test_a_bad_value_is_quoted_briefly() -> None:
    error = _refusal(orjson.dumps(gen(adapter="x" * 600_000)))
    [(field, message)] = error.problems
    assert field == "adapter"
    assert message.startswith("'" + "x" * MAX_INPUT_REPR_CHARS + "'" + TRUNCATION_MARKER)
    assert "(600000 chars) does not match" in message
    assert len(str(error)) < 300


def test_a_long_field_name_is_clipped() -> None:
    error = _refusal(orjson.dumps({**gen(), "k" * 100_000: 1}))
    [(field, message)] = error.problems
    assert field.startswith("kkk") and TRUNCATION_MARKER in field and len(field) <= 200
    assert message.startswith("is not a field")


def test_a_document_with_many_problems_lists_the_first_and_counts_the_rest() -> None:
    doc = {**gen(), **{f"extra{i}": i for i in range(1000)}}
    error = _refusal(orjson.dumps(doc))
    assert len(error.problems) == MAX_PROBLEMS + 1
    assert error.problems[-1] == ("$", f"{1000 - MAX_PROBLEMS} more problems are not listed")
