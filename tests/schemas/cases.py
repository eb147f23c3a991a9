"""Documents shared by the schema tests: each case says which field must be blamed."""

from __future__ import annotations

from typing import Any

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
]
