"""The committer on the real broker: one transaction per commit, and a state that says when not."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from lorastream.dev.topics import make_topics
from tests.kafka_util import read_all
from trainer.committer import CommitState, Committer, Outgoing
from trainer.exceptions import TrainerError
from trainer.kafka import KafkaConnection

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def _committed(bootstrap: str, group: str, tp: TopicPartition, expect: int) -> int | None:
    """The group's committed offset, read until it is ``expect`` (for at most 10 s).

    A transaction's offsets become visible once the coordinator has written the commit
    markers, which Kafka does after EndTxn has returned: on a fresh broker a read right
    after the commit can still see the offsets before it."""
    deadline = time.monotonic() + 10
    while True:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
        await consumer.start()
        try:
            value = await consumer.committed(tp)
        finally:
            await consumer.stop()
        if value == expect or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


async def test_a_record_and_offsets_commit_together_and_a_fenced_committer_stops(
    kafka_bootstrap: str, prefix: str
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    group = f"{prefix}group"
    tp = TopicPartition(topics.learning_events, 0)
    first = Committer(KafkaConnection(kafka_bootstrap), f"{prefix}txn", group)
    assert first.state is CommitState.NEW and not first.can_commit
    await first.start()
    assert first.state is CommitState.READY
    await first.commit([Outgoing(topics.adapter_updates, "a", b"one")], {tp: 7})
    assert first.state is CommitState.READY
    assert await _committed(kafka_bootstrap, group, tp, 7) == 7

    # An abort inside the transaction leaves neither the record nor the offsets behind.
    def boom() -> None:
        raise RuntimeError("injected")

    with pytest.raises(RuntimeError):
        await first.commit([Outgoing(topics.adapter_updates, "a", b"two")], {tp: 9}, inside=boom)
    assert first.state is CommitState.FAILED
    with pytest.raises(TrainerError, match="the committer is failed"):
        await first.commit((), {tp: 9})
    assert await _committed(kafka_bootstrap, group, tp, 7) == 7

    # A second instance with the same transactional id fences the first.
    second = Committer(KafkaConnection(kafka_bootstrap), f"{prefix}txn", group)
    await second.start()
    zombie = Committer(KafkaConnection(kafka_bootstrap), f"{prefix}txn", group)
    await zombie.start()  # now `second` is the stale one
    with pytest.raises(TrainerError, match="another instance took over"):
        await second.commit([Outgoing(topics.adapter_updates, "a", b"three")], {tp: 11})
    assert second.state is CommitState.FENCED
    second.fail()
    assert second.state is CommitState.FENCED, "fenced stays fenced"
    await zombie.commit((), {tp: 12})
    for committer in (first, second, zombie):
        await committer.stop()
    assert zombie.state is CommitState.STOPPED
    values = [r.value for r in await read_all(kafka_bootstrap, topics.adapter_updates, 1)]
    assert values == [b"one"]
    assert await _committed(kafka_bootstrap, group, tp, 12) == 12


async def test_offsets_only_commits_wait_for_the_idle_interval_unless_forced(
    kafka_bootstrap: str, prefix: str
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    group = f"{prefix}group"
    tp = TopicPartition(topics.learning_events, 0)
    committer = Committer(
        KafkaConnection(kafka_bootstrap), f"{prefix}txn", group, idle_commit_seconds=3600
    )
    await committer.start()
    try:
        await committer.commit((), {tp: 1})
        await committer.commit_offsets({tp: 5})  # too soon after the last commit
        assert await _committed(kafka_bootstrap, group, tp, 1) == 1
        await committer.commit_offsets({tp: 5}, force=True)
        assert await _committed(kafka_bootstrap, group, tp, 5) == 5
    finally:
        await committer.stop()
    groupless = Committer(KafkaConnection(kafka_bootstrap), f"{prefix}replay")
    with pytest.raises(TrainerError, match="the committer is new"):
        await groupless.commit((), {tp: 1})
    await groupless.start()
    try:
        with pytest.raises(TrainerError, match="only be committed for a consumer group"):
            await groupless.commit((), {tp: 1})
    finally:
        await groupless.stop()


async def test_a_refused_record_is_written_in_its_smaller_form_and_staged_ones_go_along(
    kafka_bootstrap: str, prefix: str
) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topics = await make_topics(kafka_bootstrap, prefix)
    small_topic = f"{prefix}small"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(small_topic, 1, 1, topic_configs={"max.message.bytes": "20000"})]
        )
    finally:
        await admin.close()
    group = f"{prefix}group"
    tp = TopicPartition(topics.learning_events, 0)
    committer = Committer(KafkaConnection(kafka_bootstrap), f"{prefix}txn", group)
    await committer.start()
    try:
        committer.stage(Outgoing(small_topic, None, b"staged"))
        big = Outgoing(small_topic, "a", b"x" * 50_000, (b"y" * 30_000, b"bounded"))
        await committer.commit([big], {tp: 3})
        assert committer.state is CommitState.READY and committer.staged == 0
        values = [r.value for r in await read_all(kafka_bootstrap, small_topic, 2)]
        assert values == [b"staged", b"bounded"]
        assert await _committed(kafka_bootstrap, group, tp, 3) == 3

        with pytest.raises(TrainerError, match="refuses a record of 50000 bytes"):
            await committer.commit([Outgoing(small_topic, "a", b"x" * 50_000)], {tp: 4})
        assert committer.state is CommitState.FAILED
    finally:
        await committer.stop()
    assert await _committed(kafka_bootstrap, group, tp, 3) == 3
