"""The scoring worker end to end on the real broker, as a real process.

Produces GenerationResults, runs ``lorastream score``, and reads back exactly
the expected LearningEvents (ids, flags, scores, source positions, keys) and
exactly the expected dead letters (original bytes, reason, source position).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from rouge_score import rouge_scorer

from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import Worker, worker_env
from schemas import LearningEvent, decode, read_dead_letter_headers
from tests.kafka_util import read_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REFERENCE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _doc(id_: str, **fields: Any) -> bytes:
    return orjson.dumps({"id": id_, "prompt": f"prompt of {id_}", "response": "r", **fields})


# (key, value, expectation): ("event", breakthrough) | ("none",) | ("dlq", field, reason fragment)
CASES: list[tuple[bytes | None, bytes | None, tuple[Any, ...]]] = [
    (
        b"default",
        _doc("bt", response="the cat sat", baseline="The cat sat.", entropy_delta=-0.3),
        ("event", True),
    ),
    (b"default", _doc("up", entropy_delta=0.4), ("event", False)),
    (b"default", _doc("flat", entropy_delta=0.05), ("none",)),
    (b"default", _doc("pair", entropy_before=2.0, entropy_after=1.5), ("event", False)),
    (
        b"other",
        _doc(
            "other-1", adapter="other", response="a b c d", baseline="a b x d", entropy_delta=-0.9
        ),
        ("event", True),
    ),
    (b"default", b'{"id": "broken", "prompt": ', ("dlq", "$", "not valid JSON")),
    (b"default", _doc("no-resp", response=None, entropy_delta=0.5), ("dlq", "response", "")),
    (b"x", _doc("evil", adapter="../x", entropy_delta=0.5), ("dlq", "adapter", "does not match")),
    (
        b"default",
        b'{"id": "nan", "prompt": "p", "response": "r", "entropy_delta": NaN}',
        ("dlq", "$", "not valid JSON"),
    ),
    (
        b"default",
        _doc("v2", schema_version=2, entropy_delta=0.5),
        ("dlq", "schema_version", "not supported"),
    ),
    (b"default", None, ("dlq", "$", "tombstone")),
    (b"default", b"\xff\xfe\x00garbage", ("dlq", "$", "not valid JSON")),
    (b"default", _doc("no-entropy"), ("dlq", "$", "entropy_delta")),
    (
        b"default",
        _doc("typo", baseline_response="r", entropy_delta=0.5),
        ("dlq", "baseline_response", "not a field"),
    ),
    (
        b"default",
        _doc("ru", response="Привет мир", baseline="Привет мир", entropy_delta=-0.2),
        ("event", False),
    ),
    (b"default", _doc("edge", entropy_delta=-0.15), ("none",)),
    (
        b"default",
        _doc("meta", entropy_delta=-0.6, metadata={"model": "m", "n": [1, 2]}),
        ("event", False),
    ),
]


async def test_worker_scores_exactly_the_expected_events_and_dead_letters(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    sent = await produce(kafka_bootstrap, topics.generation_results, [(k, v) for k, v, _ in CASES])
    events_expected = {
        orjson.loads(v)["id"]: (k, v, exp, meta)
        for (k, v, exp), meta in zip(CASES, sent, strict=True)
        if exp[0] == "event"
    }
    dlq_expected = {
        meta.offset: (k, v, exp)
        for (k, v, exp), meta in zip(CASES, sent, strict=True)
        if exp[0] == "dlq"
    }

    env = worker_env(kafka_bootstrap, prefix, tmp_path / "home")
    with Worker(["score"], env, tmp_path / "score.log") as worker:
        events, letters = await asyncio.gather(
            read_all(kafka_bootstrap, topics.learning_events, len(events_expected), settle=3),
            read_all(kafka_bootstrap, topics.dead_letters, len(dlq_expected), settle=3),
        )
        assert worker.alive(), worker.output()

    decoded = [decode(r.value, LearningEvent) for r in events]
    assert sorted(e.id for e in decoded) == sorted(events_expected), worker.output()
    for record, event in zip(events, decoded, strict=True):
        key, value, (_, breakthrough), meta = events_expected[event.id]
        doc = orjson.loads(value)
        assert record.key == event.adapter.encode() == doc.get("adapter", "default").encode()
        assert event.is_breakthrough is breakthrough
        baseline = doc.get("baseline")
        expected_rouge = (
            REFERENCE.score(baseline, doc["response"])["rougeL"].fmeasure if baseline else 0.0
        )
        assert event.rouge_score == expected_rouge
        assert (event.source.topic, event.source.partition, event.source.offset) == (
            topics.generation_results,
            meta.partition,
            meta.offset,
        )
        assert event.prompt == doc["prompt"] and event.response == doc["response"]
        assert event.metadata == doc.get("metadata")

    assert sorted(r.offset for r in letters) == list(range(len(letters)))
    seen = {}
    for record in letters:
        headers = read_dead_letter_headers(record.headers)
        offset = int(headers["lorastream.source.offset"])
        seen[offset] = record
        key, value, (_, field, fragment) = dlq_expected[offset]
        assert record.key == key
        assert record.value == value  # the original bytes, to fix and produce again
        assert headers["lorastream.source.topic"] == topics.generation_results
        assert headers["lorastream.source.partition"] == "0"
        assert field in headers["lorastream.fields"].split(","), headers
        assert fragment in headers["lorastream.error"], headers
        assert f"{topics.generation_results}[0]@{offset}" in headers["lorastream.error"]
    assert sorted(seen) == sorted(dlq_expected)


async def test_sigkill_mid_stream_loses_no_qualifying_event(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix, partitions=2)
    total = 12_000  # batches of up to 1000 in flight: enough that the kill lands mid-stream
    records = []
    for i in range(total):
        delta = -0.5 if i % 2 == 0 else 0.01  # every other one qualifies
        body = orjson.dumps(
            {
                "id": f"k{i}",
                "adapter": f"a{i % 3}",
                "prompt": f"p{i}",
                "response": f"response number {i}",
                "baseline": f"response {i}",
                "entropy_delta": delta,
            }
        )
        records.append((f"a{i % 3}".encode(), body))
    await produce(kafka_bootstrap, topics.generation_results, records)
    qualifying = {f"k{i}" for i in range(0, total, 2)}

    env = worker_env(kafka_bootstrap, prefix, tmp_path / "home")
    first = Worker(["score"], env, tmp_path / "score-1.log").start()
    try:
        # Kill once the worker is well into the stream but not done with it.
        partial = await read_all(
            kafka_bootstrap, topics.learning_events, 300, timeout=120, settle=0
        )
        assert len(partial) >= 300, first.output()
    finally:
        first.kill()
    killed_at = len(await read_all(kafka_bootstrap, topics.learning_events, 0, settle=1))
    assert killed_at < len(qualifying), "the worker finished before it was killed; kill sooner"

    with Worker(["score"], env, tmp_path / "score-2.log") as second:
        events = await read_all(
            kafka_bootstrap, topics.learning_events, len(qualifying), timeout=180, settle=3
        )
        assert second.alive(), second.output()

    ids = [decode(r.value, LearningEvent).id for r in events]
    assert set(ids) == qualifying, f"missing: {sorted(qualifying - set(ids))[:10]}"
    duplicates = len(ids) - len(set(ids))
    print(
        f"\nSIGKILL test: {killed_at} events out when killed, {len(ids)} in the end for "
        f"{len(qualifying)} qualifying results: {duplicates} duplicates"
    )
