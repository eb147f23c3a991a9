"""Hostile input on the real broker: nothing is skipped without a trace, nothing gets stuck.

Each test runs ``lorastream score`` as a real process against records that
used to be lost (metadata nested past orjson's limit, a dead letter over
Kafka's size limit, records of several megabytes, a send the broker
refuses) and checks that every one is on an output topic, that the record
produced after it still flows, and that the scorer's committed offset
reaches the end of the input.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord, RecordMetadata

from lorastream.dev.workers import Worker, worker_env
from lorastream.ops.admin import create_topics, topic_specs
from schemas import DeadLetterHeaders, LearningEvent, Topics, decode, read_dead_letter_headers
from schemas.limits import (
    KEPT_PAYLOAD_BYTES,
    MAX_METADATA_DEPTH,
    MAX_OUTPUT_BYTES,
    MAX_REASON_CHARS,
    TRUNCATION_MARKER,
)
from tests.kafka_util import read_all, wait_for
from tests.schemas.cases import nested
from trainer.kafka import KafkaConnection

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BIG_TOPIC_BYTES = 12_000_000


def _doc(id_: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": id_,
        "prompt": f"prompt of {id_}",
        "response": "r",
        "entropy_delta": 0.5,
        **fields,
    }


def _size(record: ConsumerRecord[bytes, bytes]) -> int:
    """What the record weighs: key, value and headers (Kafka adds a few bytes of framing)."""
    headers = sum(len(name) + len(value or b"") for name, value in record.headers)
    return len(record.key or b"") + len(record.value or b"") + headers


async def _topics(bootstrap: str, prefix: str, configs: Mapping[str, dict[str, str]]) -> Topics:
    """The pipeline's topics, as ``lorastream topics create`` makes them, plus ``configs``."""
    topics = Topics.named(prefix)
    specs = topic_specs(topics, 1, 1)
    for spec in specs:
        spec.topic_configs = {**(spec.topic_configs or {}), **configs.get(spec.name, {})}
    await create_topics(KafkaConnection(bootstrap), specs)
    return topics


async def _produce(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes]]
) -> list[RecordMetadata]:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=BIG_TOPIC_BYTES
    )
    await producer.start()
    try:
        return [await producer.send_and_wait(topic, key=k, value=v) for k, v in records]
    finally:
        await producer.stop()


async def _committed(bootstrap: str, group: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    found = offsets.get(TopicPartition(topic, 0))
    return found.offset if found is not None else -1


async def _score(
    bootstrap: str,
    prefix: str,
    topics: Topics,
    tmp_path: Path,
    events: int,
    letters: int,
    produced: int,
) -> tuple[list[LearningEvent], list[ConsumerRecord[bytes, bytes]], str]:
    """Run the scorer until ``events`` learning events and ``letters`` dead letters are out
    and it has committed all ``produced`` input offsets; return them and its log."""
    env = worker_env(bootstrap, prefix, tmp_path / "home")
    with Worker(["score"], env, tmp_path / "score.log") as worker:
        out, dead = await asyncio.gather(
            read_all(bootstrap, topics.learning_events, events, timeout=60, settle=2),
            read_all(bootstrap, topics.dead_letters, letters, timeout=60, settle=2),
        )

        async def committed_all() -> bool:
            group = f"{prefix}lorastream-scorer"
            return await _committed(bootstrap, group, topics.generation_results) >= produced

        await wait_for(committed_all, 30, "the scorer to commit every input offset")
        assert worker.alive(), worker.output()
        log = worker.output()
    return [decode(r.value, LearningEvent) for r in out], dead, log


def _only_letter(
    letters: list[ConsumerRecord[bytes, bytes]], offset: int, log: str
) -> tuple[ConsumerRecord[bytes, bytes], DeadLetterHeaders]:
    matching = [
        r
        for r in letters
        if read_dead_letter_headers(r.headers).get("lorastream.source.offset") == str(offset)
    ]
    assert len(matching) == 1, (len(letters), log)
    record = matching[0]
    assert _size(record) < MAX_OUTPUT_BYTES
    headers = DeadLetterHeaders.from_kafka(record.headers)  # the contract, validated
    assert len(headers.error) <= MAX_REASON_CHARS
    return record, headers


async def test_metadata_nested_too_deep_is_a_dead_letter_and_the_stream_goes_on(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await _topics(kafka_bootstrap, prefix, {})
    # orjson cannot write it (its limit is 254 levels); producers in other languages can.
    deep = json.dumps(_doc("deep", metadata=nested(300))).encode()
    at_limit = _doc("at-limit", metadata=nested(MAX_METADATA_DEPTH))
    sent = await _produce(
        kafka_bootstrap,
        topics.generation_results,
        [
            (b"default", deep),
            (b"default", orjson.dumps(at_limit)),
            (b"default", orjson.dumps(_doc("after"))),
        ],
    )

    events, letters, log = await _score(kafka_bootstrap, prefix, topics, tmp_path, 2, 1, 3)

    assert sorted(e.id for e in events) == ["after", "at-limit"], log
    assert next(e for e in events if e.id == "at-limit").metadata == at_limit["metadata"]
    record, headers = _only_letter(letters, sent[0].offset, log)
    assert len(letters) == 1
    assert record.value == deep and record.key == b"default"
    assert "metadata" in headers.fields.split(","), headers
    assert f"more than {MAX_METADATA_DEPTH} levels deep" in headers.error, headers
    assert not headers.truncated


async def test_a_dead_letter_that_would_be_too_large_has_a_clipped_reason(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await _topics(kafka_bootstrap, prefix, {})
    big = orjson.dumps(_doc("big-adapter", adapter="x" * 600_000))
    sent = await _produce(
        kafka_bootstrap,
        topics.generation_results,
        [(b"default", big), (b"default", orjson.dumps(_doc("after")))],
    )

    events, letters, log = await _score(kafka_bootstrap, prefix, topics, tmp_path, 1, 1, 2)

    assert [e.id for e in events] == ["after"], log
    record, headers = _only_letter(letters, sent[0].offset, log)
    assert record.value == big  # under the bound: the original bytes, whole
    assert "adapter" in headers.fields.split(",")
    assert TRUNCATION_MARKER in headers.error and "does not match" in headers.error
    assert len(headers.error) < 1_000, headers.error


@pytest.mark.parametrize(
    "kind", ["valid-json", "invalid-json", "invalid-document"], ids=lambda kind: kind
)
async def test_records_of_megabytes_become_bounded_dead_letters(
    kafka_bootstrap: str, prefix: str, tmp_path: Path, kind: str
) -> None:
    topics = await _topics(
        kafka_bootstrap,
        prefix,
        {f"{prefix}generation-results": {"max.message.bytes": str(BIG_TOPIC_BYTES)}},
    )
    size = 5_000_000
    if kind == "valid-json":
        huge = orjson.dumps(_doc("huge", prompt="p" * size))
    elif kind == "invalid-json":
        huge = b'{"id": "huge", "prompt": "' + b"p" * size
    else:
        huge = orjson.dumps(_doc("huge", adapter="../" * (size // 3)))
    sent = await _produce(
        kafka_bootstrap,
        topics.generation_results,
        [(b"default", huge), (b"default", orjson.dumps(_doc("after")))],
    )

    events, letters, log = await _score(kafka_bootstrap, prefix, topics, tmp_path, 1, 1, 2)

    assert [e.id for e in events] == ["after"], log
    record, headers = _only_letter(letters, sent[0].offset, log)
    assert headers.truncated
    assert headers.value_size == len(huge)
    assert headers.value_sha256 == hashlib.sha256(huge).hexdigest()
    assert record.value == huge[:KEPT_PAYLOAD_BYTES]
    assert record.key == b"default" and headers.key_size is None
    assert (headers.source_topic, headers.source_partition) == (topics.generation_results, 0)
    if kind == "valid-json":
        assert headers.fields == "$"
        assert "524288 bytes" in headers.error, headers.error


async def test_a_learning_event_the_broker_refuses_becomes_a_dead_letter(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await _topics(
        kafka_bootstrap, prefix, {f"{prefix}learning-events": {"max.message.bytes": "4000"}}
    )
    wordy = orjson.dumps(_doc("wordy", response="word " * 2_000))
    sent = await _produce(
        kafka_bootstrap,
        topics.generation_results,
        [(b"default", wordy), (b"default", orjson.dumps(_doc("after")))],
    )

    events, letters, log = await _score(kafka_bootstrap, prefix, topics, tmp_path, 1, 1, 2)

    assert [e.id for e in events] == ["after"], log
    record, headers = _only_letter(letters, sent[0].offset, log)
    assert record.value == wordy
    assert topics.learning_events in headers.error and "MessageSizeTooLarge" in headers.error
    assert headers.fields == "$"


async def test_a_dead_letter_the_broker_refuses_is_written_cut(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await _topics(
        kafka_bootstrap,
        prefix,
        {f"{prefix}generation-results.dlq": {"max.message.bytes": "100000"}},
    )
    broken = b'{"id": "broken", "prompt": "' + b"p" * 300_000
    sent = await _produce(
        kafka_bootstrap,
        topics.generation_results,
        [(b"default", broken), (b"default", orjson.dumps(_doc("after")))],
    )

    events, letters, log = await _score(kafka_bootstrap, prefix, topics, tmp_path, 1, 1, 2)

    assert [e.id for e in events] == ["after"], log
    record, headers = _only_letter(letters, sent[0].offset, log)
    assert headers.truncated and headers.value_size == len(broken)
    assert headers.value_sha256 == hashlib.sha256(broken).hexdigest()
    assert record.value == broken[:KEPT_PAYLOAD_BYTES]
    assert "not valid JSON" in headers.error
