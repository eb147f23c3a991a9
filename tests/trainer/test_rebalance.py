"""Two faults the soak found, each made to happen on purpose: a trainer that dies inside its
transaction, and batches fetched across a rebalance. Neither may announce a version twice,
skip an event or train one twice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner

from lorastream.dev.events import learning_event
from lorastream.dev.lineage_checks import check_trained_once, check_versions, check_windows
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import Worker, worker_env
from schemas import AdapterUpdate, decode, encode
from tests.kafka_util import read_all, wait_for
from trainer.committed import read_committed_topic
from trainer.kafka import KafkaConnection

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


async def test_a_trainer_dead_inside_its_transaction_never_hides_versions_from_another(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    """The dead trainer's open transaction holds back what read_committed readers see; a
    trainer that read its lineages then would miss v1 and v2 and announce them again."""
    topics = await make_topics(kafka_bootstrap, prefix)
    first = [(b"alpha", encode(learning_event("alpha", n))) for n in range(32)]
    await produce(kafka_bootstrap, topics.learning_events, first)
    env = worker_env(
        kafka_bootstrap,
        prefix,
        tmp_path / "home",
        LORASTREAM_ADAPTER_DIR=str(tmp_path / "ad"),
        LORASTREAM_EVAL_FRACTION="0",  # check_windows re-derives windows of every event
    )
    dying = Worker(
        ["train"],
        {**env, "LORASTREAM_INSTANCE_ID": "a", "LORASTREAM_FAULTS": "pause:commit-inside:alpha:1"},
        tmp_path / "a.log",
    ).start()
    try:
        await wait_for(dying.said("FAULT paused"), 120, "a to pause inside its transaction")
    finally:
        dying.kill()  # and it stays down: its transaction stays open until the broker aborts it
    survivor = Worker(["train"], {**env, "LORASTREAM_INSTANCE_ID": "b"}, tmp_path / "b1.log")
    with survivor:
        await wait_for(survivor.said("alpha v2:"), 180, "b to train alpha v1 and v2")
    survivor.kill()
    second = [(b"alpha", encode(learning_event("alpha", n))) for n in range(32, 48)]
    await produce(kafka_bootstrap, topics.learning_events, second)
    with Worker(["train"], {**env, "LORASTREAM_INSTANCE_ID": "b"}, tmp_path / "b2.log") as again:
        await wait_for(again.said("alpha v"), 180, "b, restarted, to train the third window")
        records = await read_all(kafka_bootstrap, topics.adapter_updates, 3, settle=2)
    updates = [decode(r.value, AdapterUpdate) for r in records]
    assert [(u.version, u.window.event_ids[0]) for u in updates] == [
        (1, "alpha-000"),
        (2, "alpha-016"),
        (3, "alpha-032"),
    ]


async def test_batches_fetched_across_rebalances_are_read_again_not_handled_twice(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    """A second trainer joins and is SIGKILLed, four times, while the first works through a
    long backlog: every rebalance lands in the middle of fetched batches."""
    partitioner = DefaultPartitioner()
    names: dict[int, str] = {}
    for i in range(50):
        names.setdefault(partitioner(f"team-{i}".encode(), [0, 1], [0, 1]), f"team-{i}")
    topics = await make_topics(kafka_bootstrap, prefix, partitions=2)
    events = []
    for n in range(800):
        for name in names.values():
            events.append((name.encode(), encode(learning_event(name, n))))
    await produce(kafka_bootstrap, topics.learning_events, events)
    env = worker_env(
        kafka_bootstrap,
        prefix,
        tmp_path / "home",
        LORASTREAM_ADAPTER_DIR=str(tmp_path / "ad"),
        LORASTREAM_EVAL_FRACTION="0",  # check_windows re-derives windows of every event
    )
    with Worker(["train"], {**env, "LORASTREAM_INSTANCE_ID": "a"}, tmp_path / "a.log") as first:
        await wait_for(first.said(" v3:"), 120, "a to train")
        for k in range(4):
            joiner = Worker(
                ["train"], {**env, "LORASTREAM_INSTANCE_ID": "b"}, tmp_path / f"b{k}.log"
            )
            joiner.start()
            await wait_for(joiner.said("resumed"), 120, "b to join")
            await asyncio.sleep(2)
            joiner.kill()
        records = await read_all(
            kafka_bootstrap, topics.adapter_updates, 100, timeout=240, settle=3
        )
        assert first.alive(), first.output()[-3000:]
    updates = [decode(r.value, AdapterUpdate) for r in records]
    learning, _ = await read_committed_topic(
        KafkaConnection(kafka_bootstrap), topics.learning_events
    )
    assert check_versions(updates) == []
    assert check_trained_once(updates) == []
    assert check_windows(learning, updates, [], topics.learning_events) == []
    assert sorted({u.adapter for u in updates}) == sorted(names.values())
    assert len(updates) == 100
