"""Hostile records for both doors of the pipeline, and a checker that accounts for every offset.

:func:`hostile_records` makes a reproducible storm for ``generation-results``
or ``learning-events``: random bytes, truncated and deeply nested JSON,
strings near and past the broker's limit, numbers such as 1e400, lone
surrogates, invalid UTF-8, odd adapter names, null and binary keys, garbage
headers, wrong types, unknown fields, tombstones; with valid records mixed
in. The accountants then read what the stages wrote and put every input
offset in exactly one outcome, or report it as lost.

It serves the tests (``tests/test_storm.py``) and the soak; the product never imports it.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from schemas import (
    AdapterUpdate,
    GenerationResult,
    LearningEvent,
    QuarantineRecord,
    SchemaError,
    decode,
    read_dead_letter_headers,
)
from streams.scoring import Thresholds, score

__all__ = [
    "Hostile",
    "account_learning_events",
    "account_results",
    "dead_letter_sources",
    "hostile_records",
    "positions",
]

ODD_NAMES: list[Any] = ["", ".", "..", "../x", "a" * 65, "ünï", "a b", "a/b", None, 7, "-x"]
ADAPTERS = ["alpha", "beta", "gamma"]


@dataclass(frozen=True)
class Hostile:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    kind: str


def _nested(depth: int) -> Any:
    doc: Any = "leaf"
    for level in range(depth):
        doc = {"k": doc} if level % 2 else [doc]
    return doc


def _result(rng: random.Random, n: int) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": f"r{n}",
        "adapter": rng.choice(ADAPTERS),
        "prompt": f"prompt {n}",
        "response": " ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat"]) for _ in range(8)),
        "entropy_delta": rng.choice([-0.5, -0.12, 0.05, 0.3]),
    }
    if rng.random() < 0.5:
        doc["baseline"] = " ".join(rng.choice(["the", "cat", "sat", "dog"]) for _ in range(8))
    return doc


def _event(rng: random.Random, n: int) -> dict[str, Any]:
    return {
        "id": f"e{n}",
        "adapter": rng.choice(ADAPTERS),
        "prompt": f"prompt {n}",
        "response": f"response {n}",
        "rouge_score": 0.5,
        "entropy_delta": -0.3,
        "is_breakthrough": False,
        "timestamp": "2026-01-01T00:00:00Z",
        "source": {"topic": "generation-results", "partition": 0, "offset": n},
    }


def _variants(rng: random.Random, doc: dict[str, Any], big: int) -> Iterator[tuple[str, Any]]:
    """(kind, value) pairs made from one valid document."""
    yield "valid", doc
    yield "odd-adapter", {**doc, "adapter": rng.choice(ODD_NAMES)}
    yield "wrong-type", {**doc, rng.choice(list(doc)): rng.choice([1, None, [], {}, True, 1.5])}
    yield "unknown-field", {**doc, "basline": "typo"}
    yield "schema-version", {**doc, "schema_version": rng.choice([0, 2, "1", 1.0])}
    yield "huge-number", b'{"id": "x", "entropy_delta": 1e400, "prompt": "p", "response": "r"}'
    yield "big-int", {**doc, "entropy_delta": 10**30}
    yield "nan-literal", b'{"id": "x", "entropy_delta": NaN, "prompt": "p", "response": "r"}'
    yield "lone-surrogate", orjson.dumps(doc)[:-1] + b', "metadata": {"s": "\\ud800"}}'
    yield "invalid-utf8", orjson.dumps(doc).replace(b"prompt ", b"prompt \xff\xfe ")
    yield "truncated-json", orjson.dumps(doc)[: rng.randrange(1, 40)]
    yield "deep-metadata", {**doc, "metadata": _nested(rng.choice([40, 63, 64, 65, 200, 300]))}
    yield "deep-json", b"[" * rng.choice([100, 300, 1000, 5000]) + b"]" * 10
    yield "random-bytes", rng.randbytes(rng.randrange(0, 400))
    yield "not-an-object", rng.choice([b"[]", b"1", b'"s"', b"null", b"true"])
    yield "empty", b""
    yield "tombstone", None
    yield "long-id", {**doc, "id": "i" * 300}
    yield "big-text", {**doc, "prompt": "x" * big}


def hostile_records(door: str, count: int, seed: int = 0, big_every: int = 2000) -> list[Hostile]:
    """``count`` records for ``door`` ("generation-results" or "learning-events").

    One in ``big_every`` carries a text near the broker's 1 MB limit (or, for
    the first, past 512 KiB: valid JSON the contract refuses as too large).
    """
    rng = random.Random(seed)
    out: list[Hostile] = []
    n = 0
    while len(out) < count:
        doc = _result(rng, n) if door == "generation-results" else _event(rng, n)
        big = rng.choice([600_000, 900_000, 990_000]) if n % big_every == 0 else 2_000
        for kind, value in _variants(rng, doc, big):
            if kind == "big-text" and n % big_every:
                continue
            raw = value if value is None or isinstance(value, bytes) else _dumps(value)
            key_kind = rng.random()
            key = (
                None
                if key_kind < 0.1
                else rng.randbytes(8)
                if key_kind < 0.2
                else str(rng.choice(ODD_NAMES)).encode()
                if key_kind < 0.3
                else str(doc["adapter"]).encode()
            )
            if raw is None and key is None:
                key = b"tombstone"  # Kafka takes no record without both
            headers = (
                [(rng.choice(["", "x", "lorastream.error", "ü"]), rng.randbytes(8))]
                if rng.random() < 0.2
                else []
            )
            out.append(Hostile(key, raw, headers, kind))
            if len(out) == count:
                break
        n += 1
    return out


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        import json

        return json.dumps(value).encode()


@dataclass
class Accounting:
    """Every input offset in one outcome: ``lost`` and ``conflicting`` must be empty."""

    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    lost: list[tuple[int, int]] = field(default_factory=list)
    conflicting: list[tuple[int, int]] = field(default_factory=list)


def _kind_of(error: SchemaError) -> str:
    fields = ",".join(sorted({f.split(".")[0] for f, _ in error.problems}))
    return fields or "$"


Position = tuple[int, int]
"""(partition, offset) of an input record."""


def account_results(
    values: dict[Position, bytes | None],
    events_by_source: set[Position],
    dead_by_source: set[Position],
    thresholds: Thresholds | None = None,
) -> Accounting:
    """Each generation-results record: scored into an event, scored and not qualifying, or
    dead-lettered, as the contract says it must be; anything else is lost."""
    thresholds = thresholds or Thresholds()
    acc = Accounting()
    for position, value in sorted(values.items()):
        try:
            result = decode(value, GenerationResult)
        except SchemaError as exc:
            expected = "dead-lettered"
            acc.reasons[_kind_of(exc)] += 1
        else:
            expected = "event" if score(result, thresholds).qualifies else "not qualifying"
        seen_event, seen_dead = position in events_by_source, position in dead_by_source
        if seen_event and seen_dead:
            acc.conflicting.append(position)
        elif (expected == "event" and not seen_event) or (
            expected == "dead-lettered" and not seen_dead
        ):
            acc.lost.append(position)
        elif expected == "not qualifying" and (seen_event or seen_dead):
            acc.conflicting.append(position)
        acc.outcomes[expected] += 1
    return acc


def account_learning_events(
    values: dict[Position, bytes | None],
    updates: list[AdapterUpdate],
    quarantined: list[QuarantineRecord],
    window: int,
) -> Accounting:
    """Each learning-events record: trained in an announced window, part of a quarantined
    window, skipped as a duplicate of a trained id, waiting in its adapter's open window
    (fewer than ``window`` distinct events), or quarantined as unreadable."""
    acc = Accounting()
    trained = {i for u in updates for i in u.window.event_ids}
    windows = [
        (u.window.partition, u.window.first_offset, u.window.last_offset, set(u.window.event_ids))
        for u in updates
    ]
    in_quarantined_window = {
        i for q in quarantined if q.window is not None for i in q.window.event_ids
    }
    bad = {(q.source.partition, q.source.offset) for q in quarantined if q.source is not None}
    open_ids: dict[tuple[int, str], dict[str, Position]] = {}
    for position, value in sorted(values.items()):
        partition, offset = position
        try:
            event = decode(value, LearningEvent)
        except SchemaError as exc:
            acc.reasons[_kind_of(exc)] += 1
            outcome = "quarantined record" if position in bad else "lost"
        else:
            if position in bad:
                acc.conflicting.append(position)
            if event.id in in_quarantined_window:
                outcome = "quarantined window"
            elif event.id in trained:
                inside = any(
                    p == partition and lo <= offset <= hi and event.id in ids
                    for p, lo, hi, ids in windows
                )
                outcome = "trained" if inside else "duplicate skipped"
            else:
                open_ids.setdefault((partition, event.adapter), {}).setdefault(event.id, position)
                outcome = "open window"
        if outcome == "lost":
            acc.lost.append(position)
        acc.outcomes[outcome] += 1
    last_trained: dict[tuple[int, str], int] = {}
    for u in updates:
        key = (u.window.partition, u.adapter)
        last_trained[key] = max(last_trained.get(key, -1), u.window.last_offset)
    for key, ids in open_ids.items():
        # Untrained events before the adapter's newest window were skipped; those after
        # it wait in its open window, which holds fewer than a window's worth.
        passed = [pos for pos in ids.values() if pos[1] < last_trained.get(key, -1)]
        waiting = [pos for pos in ids.values() if pos[1] > last_trained.get(key, -1)]
        acc.lost.extend(passed)
        if len(waiting) >= window:
            acc.lost.extend(waiting)
    return acc


def dead_letter_sources(records: list[Any]) -> set[Position]:
    """The (partition, offset) each dead letter came from."""
    out = set()
    for record in records:
        headers = read_dead_letter_headers(record.headers)
        out.add(
            (int(headers["lorastream.source.partition"]), int(headers["lorastream.source.offset"]))
        )
    return out


def positions(records: list[Any]) -> dict[Position, bytes | None]:
    return {(r.partition, r.offset): r.value for r in records}
