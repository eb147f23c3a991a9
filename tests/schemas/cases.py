"""Documents shared by the schema tests: each case says which field must be blamed."""

from __future__ import annotations

from typing import Any

from schemas import GenerationResult, encode
from schemas.limits import MAX_METADATA_DEPTH, MAX_RESULT_BYTES

BASE: dict[str, Any] = {
    "id": "r-1",
    "prompt": "What is 2+2?",
    "response": "4",
    "entropy_delta": -0.3,
}


def gen(**changes: Any) -> dict[str, Any]:
    doc = dict(BASE)
    for key, value in changes.items():
        if value is _DROP:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


_DROP = object()
DROP = _DROP


def nested(depth: int) -> dict[str, Any]:
    """An object nesting objects and arrays ``depth`` levels deep, itself being level 1."""
    node: Any = "leaf"
    for level in range(depth, 0, -1):
        node = {"a": node, "level": level} if level % 2 else [level, node]
    assert isinstance(node, dict)
    return node


def weighing(size: int) -> dict[str, Any]:
    """A valid GenerationResult that lorastream encodes in exactly ``size`` bytes."""
    doc = gen(prompt="")
    padding = size - len(encode(GenerationResult.model_validate(doc)))
    return gen(prompt="p" * padding)


# (case id, document, field that the error must name)
GENERATION_REJECTS: list[tuple[str, Any, str]] = [
    ("missing-id", gen(id=DROP), "id"),
    ("empty-id", gen(id=""), "id"),
    ("id-too-long", gen(id="x" * 257), "id"),
    ("id-number", gen(id=7), "id"),
    ("missing-prompt", gen(prompt=DROP), "prompt"),
    ("prompt-number", gen(prompt=1), "prompt"),
    ("missing-response", gen(response=DROP), "response"),
    ("response-null", gen(response=None), "response"),
    ("response-list", gen(response=["a"]), "response"),
    ("adapter-empty", gen(adapter=""), "adapter"),
    ("adapter-path", gen(adapter="../etc"), "adapter"),
    ("adapter-slash", gen(adapter="a/b"), "adapter"),
    ("adapter-leading-dash", gen(adapter="-a"), "adapter"),
    ("adapter-leading-dot", gen(adapter=".hidden"), "adapter"),
    ("adapter-too-long", gen(adapter="a" * 65), "adapter"),
    ("adapter-non-ascii", gen(adapter="café"), "adapter"),
    ("adapter-space", gen(adapter="my adapter"), "adapter"),
    ("adapter-number", gen(adapter=3), "adapter"),
    ("baseline-number", gen(baseline=0.5), "baseline"),
    ("no-entropy", gen(entropy_delta=DROP), "$"),
    ("entropy-delta-null-only", gen(entropy_delta=None), "$"),
    ("only-entropy-before", gen(entropy_delta=DROP, entropy_before=1.0), "$"),
    ("only-entropy-after", gen(entropy_delta=DROP, entropy_after=1.0), "$"),
    ("entropy-delta-string", gen(entropy_delta="-0.3"), "entropy_delta"),
    ("entropy-delta-bool", gen(entropy_delta=True), "entropy_delta"),
    ("entropy-before-string", gen(entropy_before="1", entropy_after=0.5), "entropy_before"),
    (
        "entropy-pair-overflows",
        gen(entropy_delta=DROP, entropy_before=-1.7e308, entropy_after=1.7e308),
        "$",
    ),
    ("created-at-naive", gen(created_at="2026-01-31T12:00:00"), "created_at"),
    ("created-at-garbage", gen(created_at="yesterday"), "created_at"),
    ("created-at-epoch-number", gen(created_at=1769860800), "created_at"),
    ("metadata-list", gen(metadata=[1, 2]), "metadata"),
    ("metadata-string", gen(metadata="x"), "metadata"),
    # Beyond JSON Schema: see BEYOND_JSON_SCHEMA in test_json_schema.py.
    ("metadata-too-deep", gen(metadata=nested(MAX_METADATA_DEPTH + 1)), "metadata"),
    ("too-large", weighing(MAX_RESULT_BYTES + 1), "$"),
    ("schema-version-2", gen(schema_version=2), "schema_version"),
    ("schema-version-0", gen(schema_version=0), "schema_version"),
    ("schema-version-string", gen(schema_version="1"), "schema_version"),
    ("unknown-field", gen(baseline_response="4"), "baseline_response"),
    ("not-an-object", [BASE], "$"),
    ("null-document", None, "$"),
]

GENERATION_ACCEPTS: list[tuple[str, dict[str, Any]]] = [
    ("minimal", gen()),
    ("pair-only", gen(entropy_delta=DROP, entropy_before=2.0, entropy_after=1.5)),
    ("delta-and-pair", gen(entropy_before=2.0, entropy_after=1.5)),
    ("integer-delta", gen(entropy_delta=-1)),
    (
        "all-fields",
        gen(
            schema_version=1,
            adapter="math-tutor_v2.1",
            baseline="four",
            created_at="2026-01-31T12:00:00.123+01:00",
            metadata={"model": "llama", "nested": {"a": [1, 2]}},
        ),
    ),
    ("unicode-text", gen(prompt="Привет, 世界 🌍", response="ça va ﬁne", baseline="")),
    ("adapter-max-length", gen(adapter="a" * 64)),
    ("empty-prompt-and-response", gen(prompt="", response="")),
    ("id-max-length", gen(id="x" * 256)),
    ("nulls-for-optionals", gen(baseline=None, created_at=None, metadata=None)),
    ("metadata-max-depth", gen(metadata=nested(MAX_METADATA_DEPTH))),
    ("largest", weighing(MAX_RESULT_BYTES)),
]


def learning_event(id_: str, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": id_,
        "adapter": "a1",
        "prompt": f"prompt of {id_}",
        "response": "r",
        "rouge_score": 0.8,
        "entropy_delta": -0.2,
        "is_breakthrough": True,
        "timestamp": "2026-01-31T12:00:00Z",
        "source": {"topic": "generation-results", "partition": 0, "offset": 12},
    }
    doc.update(changes)
    return doc


def quarantined_window(**changes: Any) -> dict[str, Any]:
    """A window of two events that failed three tries."""
    doc: dict[str, Any] = {
        "adapter": "a1",
        "error": "step 1: loss is nan; step 2: loss is nan; step 3: loss is nan",
        "tries": 3,
        "window": {
            "topic": "learning-events",
            "partition": 1,
            "first_offset": 40,
            "last_offset": 41,
            "size": 2,
            "event_ids": ["e-1", "e-2"],
        },
        "events": [learning_event("e-1"), learning_event("e-2")],
        "created_at": "2026-01-31T12:00:00Z",
    }
    return _changed(doc, changes)


def quarantined_record(**changes: Any) -> dict[str, Any]:
    """One learning-events record that could not be read."""
    doc: dict[str, Any] = {
        "adapter": "a1",
        "error": "invalid LearningEvent at learning-events[0]@7: $: not valid JSON",
        "tries": 0,
        "source": {"topic": "learning-events", "partition": 0, "offset": 7},
        "value_base64": "eyJpZCI6",
        "created_at": "2026-01-31T12:00:00Z",
    }
    return _changed(doc, changes)


def dead_letter(changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dead-letter headers as a JSON object: header name -> string value."""
    doc: dict[str, Any] = {
        "lorastream.error": "invalid GenerationResult at generation-results[0]@5: "
        "response: is required",
        "lorastream.error.type": "GenerationResult",
        "lorastream.fields": "response",
        "lorastream.source.topic": "generation-results",
        "lorastream.source.partition": "0",
        "lorastream.source.offset": "5",
        "lorastream.source.timestamp": "1769860800000",
    }
    return _changed(doc, changes or {})


def _changed(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if value is _DROP:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


WINDOW = quarantined_window()["window"]

# (case id, document, field that the error must name)
QUARANTINE_REJECTS: list[tuple[str, Any, str]] = [
    ("neither-window-nor-source", quarantined_record(source=DROP), "$"),
    (
        "window-and-source",
        quarantined_window(source={"topic": "t", "partition": 0, "offset": 1}),
        "$",
    ),
    ("window-tries-0", quarantined_window(tries=0), "$"),
    ("record-tries-1", quarantined_record(tries=1), "$"),
    ("record-with-events", quarantined_record(events=[learning_event("e-1")]), "$"),
    ("window-with-value", quarantined_window(value_base64="eyJpZCI6"), "$"),
    ("negative-tries", quarantined_record(tries=-1), "tries"),
    ("tries-string", quarantined_window(tries="3"), "tries"),
    ("missing-adapter", quarantined_record(adapter=DROP), "adapter"),
    ("adapter-number", quarantined_record(adapter=7), "adapter"),
    ("missing-error", quarantined_window(error=DROP), "error"),
    ("missing-tries", quarantined_window(tries=DROP), "tries"),
    (
        "bad-event",
        quarantined_window(events=[learning_event("e-1"), {"id": "e-2"}]),
        "events.1.adapter",
    ),
    ("events-null", quarantined_window(events=None), "events"),
    ("window-not-object", quarantined_window(window=[1]), "window"),
    (
        "window-size-0",
        quarantined_window(window={**WINDOW, "size": 0, "event_ids": []}, events=[]),
        "window.size",
    ),
    (
        "source-offset-missing",
        quarantined_record(source={"topic": "t", "partition": 0}),
        "source.offset",
    ),
    ("value-not-base64", quarantined_record(value_base64="not base64!"), "value_base64"),
    ("value-unpadded", quarantined_record(value_base64="eyJpZCI"), "value_base64"),
    ("value-number", quarantined_record(value_base64=12), "value_base64"),
    ("created-at-naive", quarantined_record(created_at="2026-01-31T12:00:00"), "created_at"),
    ("created-at-null", quarantined_record(created_at=None), "created_at"),
    ("schema-version-2", quarantined_record(schema_version=2), "schema_version"),
    # Beyond JSON Schema: see BEYOND_JSON_SCHEMA in test_json_schema.py.
    (
        "events-not-the-window",
        quarantined_window(events=[learning_event("e-2"), learning_event("e-1")]),
        "$",
    ),
    ("events-fewer-than-window", quarantined_window(events=[learning_event("e-1")]), "$"),
    ("window-size-mismatch", quarantined_window(window={**WINDOW, "size": 3}), "window"),
]

QUARANTINE_ACCEPTS: list[tuple[str, dict[str, Any]]] = [
    ("window", quarantined_window()),
    ("record", quarantined_record()),
    ("tombstone", quarantined_record(value_base64=None)),
    ("empty-value", quarantined_record(value_base64="")),
    ("record-without-key", quarantined_record(adapter=None)),
    ("key-not-an-adapter-name", quarantined_record(adapter="../not a name")),
    ("nulls-for-the-other-kind", quarantined_window(source=None, value_base64=None)),
    ("record-null-window", quarantined_record(window=None, events=[])),
    ("no-created-at", quarantined_record(created_at=DROP)),
    ("fields-of-newer-writers", quarantined_window(added_later={"x": 1})),
]

# The headers of a dead letter whose value (or key) was cut.
VALUE_CUT = {
    "lorastream.truncated": "1",
    "lorastream.value.size": "5000000",
    "lorastream.value.sha256": "ab" * 32,
}
KEY_CUT = {
    "lorastream.truncated": "1",
    "lorastream.key.size": "70000",
    "lorastream.key.sha256": "cd" * 32,
}

# (case id, headers as a JSON object, header that the error must name)
DEAD_LETTER_REJECTS: list[tuple[str, Any, str]] = [
    (f"missing-{name}", dead_letter({name: DROP}), name)
    for name in (
        "lorastream.error",
        "lorastream.error.type",
        "lorastream.fields",
        "lorastream.source.topic",
        "lorastream.source.partition",
        "lorastream.source.offset",
    )
] + [
    ("empty-error", dead_letter({"lorastream.error": ""}), "lorastream.error"),
    ("empty-type", dead_letter({"lorastream.error.type": ""}), "lorastream.error.type"),
    ("empty-topic", dead_letter({"lorastream.source.topic": ""}), "lorastream.source.topic"),
    ("null-error", dead_letter({"lorastream.error": None}), "lorastream.error"),
    (
        "null-timestamp",
        dead_letter({"lorastream.source.timestamp": None}),
        "lorastream.source.timestamp",
    ),
    (
        "partition-negative",
        dead_letter({"lorastream.source.partition": "-1"}),
        "lorastream.source.partition",
    ),
    (
        "partition-word",
        dead_letter({"lorastream.source.partition": "zero"}),
        "lorastream.source.partition",
    ),
    (
        "offset-leading-zero",
        dead_letter({"lorastream.source.offset": "05"}),
        "lorastream.source.offset",
    ),
    ("offset-plus", dead_letter({"lorastream.source.offset": "+5"}), "lorastream.source.offset"),
    ("offset-space", dead_letter({"lorastream.source.offset": " 5"}), "lorastream.source.offset"),
    (
        "offset-underscore",
        dead_letter({"lorastream.source.offset": "1_000"}),
        "lorastream.source.offset",
    ),
    ("offset-empty", dead_letter({"lorastream.source.offset": ""}), "lorastream.source.offset"),
    (
        "offset-fraction",
        dead_letter({"lorastream.source.offset": "5.0"}),
        "lorastream.source.offset",
    ),
    (
        "timestamp-float",
        dead_letter({"lorastream.source.timestamp": "1.5e12"}),
        "lorastream.source.timestamp",
    ),
    ("error-too-long", dead_letter({"lorastream.error": "e" * 2001}), "lorastream.error"),
    ("fields-too-long", dead_letter({"lorastream.fields": "f," * 1001}), "lorastream.fields"),
    (
        "topic-too-long",
        dead_letter({"lorastream.source.topic": "t" * 250}),
        "lorastream.source.topic",
    ),
    (
        "truncated-0",
        dead_letter({**VALUE_CUT, "lorastream.truncated": "0"}),
        "lorastream.truncated",
    ),
    (
        "truncated-true",
        dead_letter({**VALUE_CUT, "lorastream.truncated": "true"}),
        "lorastream.truncated",
    ),
    ("truncated-says-not-what", dead_letter({"lorastream.truncated": "1"}), "$"),
    ("cut-not-flagged", dead_letter({**VALUE_CUT, "lorastream.truncated": DROP}), "$"),
    ("value-size-without-sha256", dead_letter({**VALUE_CUT, "lorastream.value.sha256": DROP}), "$"),
    ("value-sha256-without-size", dead_letter({**VALUE_CUT, "lorastream.value.size": DROP}), "$"),
    ("key-size-without-sha256", dead_letter({**KEY_CUT, "lorastream.key.sha256": DROP}), "$"),
    (
        "value-sha256-uppercase",
        dead_letter({**VALUE_CUT, "lorastream.value.sha256": "AB" * 32}),
        "lorastream.value.sha256",
    ),
    (
        "value-size-negative",
        dead_letter({**VALUE_CUT, "lorastream.value.size": "-1"}),
        "lorastream.value.size",
    ),
]

DEAD_LETTER_ACCEPTS: list[tuple[str, dict[str, Any]]] = [
    ("all", dead_letter()),
    ("no-timestamp", dead_letter({"lorastream.source.timestamp": DROP})),
    ("timestamp-minus-1", dead_letter({"lorastream.source.timestamp": "-1"})),
    ("offset-0", dead_letter({"lorastream.source.offset": "0"})),
    ("whole-document", dead_letter({"lorastream.fields": "$"})),
    ("no-fields", dead_letter({"lorastream.fields": ""})),
    ("many-fields", dead_letter({"lorastream.fields": "prompt,source.offset,$"})),
    ("unicode-error", dead_letter({"lorastream.error": "invalid: «réponse» 🚫"})),
    ("big-offset", dead_letter({"lorastream.source.offset": "9223372036854775807"})),
    ("other-headers", dead_letter({"traceparent": "00-abc-01", "lorastream.later": "x"})),
    ("error-at-limit", dead_letter({"lorastream.error": "e" * 2000})),
    ("value-cut", dead_letter(VALUE_CUT)),
    ("key-cut", dead_letter(KEY_CUT)),
    ("both-cut", dead_letter({**KEY_CUT, **VALUE_CUT})),
]
