"""``lorastream status`` on a real broker, over a stream this test writes record by record:
learning events, an announcement, a quarantined window, dead letters, committed offsets."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from lorastream.dev.events import learning_event
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import LORASTREAM
from lorastream.ops.status import AdapterStatus, GroupLag
from schemas import AdapterUpdate, LoraSpec, QuarantineRecord, WindowSpec, encode

pytestmark = pytest.mark.timeout(90)


ADAPTERS = "/nowhere/adapters"  # the announcement's files are not there: alpha is on hold


def _status(bootstrap: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "LORASTREAM_TOPIC_PREFIX": prefix,
        "LORASTREAM_ADAPTER_DIR": ADAPTERS,
    }
    return subprocess.run(
        [LORASTREAM, "status", *args], env=env, capture_output=True, text=True, timeout=60
    )


def _window(topic: str, first: int, ids: list[str]) -> WindowSpec:
    return WindowSpec(
        topic=topic,
        partition=0,
        first_offset=first,
        last_offset=first + len(ids) - 1,
        size=len(ids),
        event_ids=ids,
    )


async def _commit(bootstrap: str, group: str, topic: str, offset: int) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.commit({tp: offset})
    finally:
        await consumer.stop()


async def test_status_shows_versions_pending_events_lags_dead_letters_and_quarantines(
    kafka_bootstrap: str, prefix: str
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    events = [learning_event("alpha", n) for n in range(6)] + [
        learning_event("beta", n) for n in range(3)
    ]
    await produce(
        kafka_bootstrap,
        topics.learning_events,
        [(e.adapter.encode(), encode(e)) for e in events],
    )
    # alpha v1 holds offsets 0..3, its window at offset 4 was quarantined: alpha-005 waits,
    # and beta's three events (offsets 6..8), which no version holds.
    created = datetime.now(UTC) - timedelta(minutes=2)
    update = AdapterUpdate(
        adapter="alpha",
        version=1,
        parent_version=None,
        base_model="tiny",
        uri=f"{ADAPTERS}/alpha/v1",
        sha256="0" * 64,
        lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
        window=_window(topics.learning_events, 0, [e.id for e in events[:4]]),
        train_loss=1.25,
        created_at=created,
    )
    await produce(kafka_bootstrap, topics.adapter_updates, [(b"alpha", encode(update))])
    quarantined = QuarantineRecord(
        adapter="alpha",
        error="step failed",
        tries=3,
        window=_window(topics.learning_events, 4, [events[4].id]),
        events=[events[4]],
    )
    await produce(kafka_bootstrap, topics.quarantine, [(b"alpha", encode(quarantined))])
    await produce(kafka_bootstrap, topics.dead_letters, [(None, b"bad 1"), (None, b"bad 2")])
    await produce(kafka_bootstrap, topics.generation_results, [(None, b"{}")] * 10)
    await _commit(kafka_bootstrap, f"{prefix}lorastream-trainer", topics.learning_events, 5)
    await _commit(kafka_bootstrap, f"{prefix}lorastream-scorer", topics.generation_results, 7)

    done = _status(kafka_bootstrap, prefix, "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    by_name = {a["adapter"]: a for a in status["adapters"]}
    assert by_name["alpha"]["version"] == 1
    assert by_name["alpha"]["created_at"] == created.isoformat()
    assert 110 <= by_name["alpha"]["age_seconds"] < 200
    assert by_name["alpha"]["pending_events"] == 1
    assert by_name["alpha"]["window_size"] == 4  # its window's, whatever this shell says
    assert by_name["alpha"]["quarantined_windows"] == 1
    # The trainer could not step on alpha v1, whose directory is not there: status says so.
    assert f"directory {ADAPTERS}/alpha/v1 is missing" in by_name["alpha"]["hold"]
    assert by_name["beta"] == {
        "adapter": "beta",
        "version": 0,
        "created_at": None,
        "age_seconds": None,
        "pending_events": 3,
        "window_size": None,  # no version: the lineage says nothing yet, the shell is not asked
        "quarantined_windows": 0,
        "hold": None,
    }
    assert status["lag"]["trainer"] == {
        "group": f"{prefix}lorastream-trainer",
        "topic": topics.learning_events,
        "total": 4,
        "partitions": {"0": 4},
    }
    assert status["lag"]["scorer"]["total"] == 3
    assert status["dead_letters"] == {"topic": topics.dead_letters, "records": 2}

    table = _status(kafka_bootstrap, prefix)
    assert table.returncode == 0, table.stderr
    assert "alpha" in table.stdout and "beta" in table.stdout
    assert f"trainer lag: 4 on {topics.learning_events}" in table.stdout
    assert f"scorer lag: 3 on {topics.generation_results}" in table.stdout
    assert f"dead letters: 2 in {topics.dead_letters}" in table.stdout
    assert "on hold: alpha: adapter alpha v1: directory" in table.stdout
    assert "lorastream adapters repair alpha" in table.stdout


async def test_a_group_that_never_ran_lags_by_the_whole_topic(
    kafka_bootstrap: str, prefix: str
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    await produce(kafka_bootstrap, topics.generation_results, [(None, b"{}")] * 4)
    done = _status(kafka_bootstrap, prefix, "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["adapters"] == []
    assert status["lag"]["scorer"]["total"] == 4
    assert status["lag"]["trainer"]["total"] == 0
    assert status["dead_letters"]["records"] == 0


def test_missing_topics_and_a_broker_that_is_down_are_one_line(
    kafka_bootstrap: str, prefix: str
) -> None:
    missing = _status(kafka_bootstrap, prefix)
    assert missing.returncode == 1
    assert missing.stderr.startswith("KafkaSetupError: topics ")
    assert "run `lorastream topics create`" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    down = _status("127.0.0.1:1", prefix)
    assert down.returncode == 1
    assert len(down.stderr.strip().splitlines()) == 1
    assert "Traceback" not in down.stderr


def test_an_adapter_without_a_version_has_no_age() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    assert AdapterStatus("a", 0, None, 2, 0).age_seconds(at) is None
    assert AdapterStatus("a", 3, at - timedelta(seconds=90), 0, 0).age_seconds(at) == 90
    assert GroupLag("g", "t", {0: 2, 1: 5}).total == 7
