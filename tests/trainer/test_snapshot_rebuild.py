"""Snapshots are a cache of adapter-updates: one that cannot be read is rebuilt, never reset.

What compaction leaves of ``adapter-updates.latest`` is the newest record per key.
When that record is garbage, a tombstone or a snapshot of another adapter, or the
completion record is missing or tombstoned, the lineages are read from
``adapter-updates`` in full and the snapshots are written again; an announced
version's files never change (issue #20, part 2).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from lorastream.dev.events import learning_event
from lorastream.dev.topics import make_topics, produce
from lorastream.ops.admin import create_topics, topic_specs
from schemas import AdapterUpdate, Topics, decode, encode
from tests.kafka_util import read_all, wait_for
from tests.trainer.test_snapshot import _update as _update_at
from trainer.history import LineageLog, _tail_doubt
from trainer.kafka import KafkaConnection
from trainer.lineage import Lineage
from trainer.signing import Verifier
from trainer.snapshot import COMPLETE, LineageSnapshot, completion, snapshot_of


def _update(adapter: str, version: int) -> AdapterUpdate:
    """Version ``version`` of ``adapter``: windows of 4 events, one after the other."""
    return _update_at(adapter, version, 4 * (version - 1))


def _lineage(adapter: str, versions: int) -> Lineage:
    lineage = Lineage(adapter)
    for version in range(1, versions + 1):
        lineage.record_update(_update(adapter, version))
    return lineage


async def _history_and_snapshots(bootstrap: str, topics: Topics) -> None:
    """tutor v1–v3 on adapter-updates; its v3 snapshot and the completion on the latest topic."""
    await produce(
        bootstrap,
        topics.adapter_updates,
        [(b"tutor", encode(_update("tutor", v))) for v in range(1, 4)],
    )
    records = completion({"tutor": _lineage("tutor", 3)}, by="test")
    await produce(bootstrap, topics.adapter_latest, [(k.encode(), v) for k, v in records])


def _log(bootstrap: str, topics: Topics) -> LineageLog:
    return LineageLog(
        KafkaConnection(bootstrap),
        topics.adapter_updates,
        topics.quarantine,
        latest_topic=topics.adapter_latest,
    )


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"tutor", b"{garbage"),
        (b"tutor", orjson.dumps({"adapter": "tutor", "update": {"version": 9}})),
        (b"tutor", None),
        (b"tutor", encode(snapshot_of(_lineage("other", 7)))),
        (COMPLETE.encode(), None),
        (COMPLETE.encode(), b"not json"),
    ],
    ids=[
        "bad-json",
        "schema-error",
        "tombstone",
        "another-adapters-snapshot",
        "completion-tombstone",
        "completion-garbage",
    ],
)
async def test_an_unreadable_newest_record_makes_a_full_read_of_the_history(
    kafka_bootstrap: str,
    prefix: str,
    key: bytes,
    value: bytes | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A readable v3 snapshot lies under the newest record, as before compaction: the
    reader still does not trust it, since compaction would leave only the newest."""
    topics = await make_topics(kafka_bootstrap, prefix)
    await _history_and_snapshots(kafka_bootstrap, topics)
    await produce(kafka_bootstrap, topics.adapter_latest, [(key, value)])

    log = _log(kafka_bootstrap, topics)
    with caplog.at_level(logging.WARNING, logger="trainer.history"):
        lineages = await log.refresh()
    assert log.needs_snapshots, "an unreadable snapshot was trusted"
    assert [u.version for u in lineages["tutor"].updates] == [1, 2, 3], "not the full history"
    said = [r.getMessage() for r in caplog.records if "cannot be trusted" in r.getMessage()]
    assert len(said) == 1, caplog.text


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_a_missing_completion_and_a_snapshot_the_history_contradicts(
    kafka_bootstrap: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No completion record: the history is read in full, and the snapshot that says v5
    where adapter-updates holds v3 loses, in one line."""
    topics = await make_topics(kafka_bootstrap, prefix)
    await produce(
        kafka_bootstrap,
        topics.adapter_updates,
        [(b"tutor", encode(_update("tutor", v))) for v in range(1, 4)],
    )
    forged = snapshot_of(_lineage("tutor", 5))
    await produce(kafka_bootstrap, topics.adapter_latest, [(b"tutor", encode(forged))])

    log = _log(kafka_bootstrap, topics)
    with caplog.at_level(logging.WARNING, logger="trainer.history"):
        lineages = await log.refresh()
    assert log.needs_snapshots
    assert lineages["tutor"].version == 3
    wins = [r.getMessage() for r in caplog.records if "adapter-updates wins" in r.getMessage()]
    assert wins == [
        f"adapter-updates and the snapshots on {topics.adapter_latest} disagree; "
        "adapter-updates wins: tutor: snapshot v5, adapter-updates v3"
    ], caplog.text


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_an_adapter_without_a_snapshot_is_checked_against_the_history(
    kafka_bootstrap: str, prefix: str
) -> None:
    """The snapshot topic is complete but has nothing of tutor (its snapshot was
    tombstoned and the cleaner then dropped the tombstone): before tutor's first version
    the trainer reads the history, which holds v1–v3."""
    topics = await make_topics(kafka_bootstrap, prefix)
    await produce(
        kafka_bootstrap,
        topics.adapter_updates,
        [(b"tutor", encode(_update("tutor", v))) for v in range(1, 4)]
        + [(b"other", encode(_update("other", 1)))],
    )
    records = completion({"other": _lineage("other", 1)}, by="test")
    await produce(kafka_bootstrap, topics.adapter_latest, [(k.encode(), v) for k, v in records])

    log = _log(kafka_bootstrap, topics)
    lineages = await log.refresh()
    assert not log.needs_snapshots and "tutor" not in lineages
    lineages.setdefault("tutor", Lineage("tutor"))  # as the trainer does with tutor's events
    lineages = await log.refresh()
    assert lineages["tutor"].version == 3, "tutor would be announced at v1 again"
    assert lineages["other"].version == 1
    assert log.needs_snapshots


def _record(update: AdapterUpdate, offset: int) -> ConsumerRecord[bytes, bytes]:
    value = encode(update)
    return ConsumerRecord(
        "adapter-updates", 0, offset, 0, 0, update.adapter.encode(), value, None, 0, len(value), []
    )


def test_history_read_after_the_snapshots_must_continue_them() -> None:
    snapshot = snapshot_of(_lineage("tutor", 3))
    snapshots = {"tutor": snapshot}
    verifier = Verifier()

    def doubt(*versions: int, sha: str | None = None) -> str | None:
        updates = [_update("tutor", v) for v in versions]
        if sha is not None:
            updates = [
                u.model_copy(update={"sha256": sha}) if u.version == 3 else u for u in updates
            ]
        records = [_record(u, n) for n, u in enumerate(updates)]
        return _tail_doubt(snapshots, records, verifier)

    assert doubt() is None  # nothing since
    assert doubt(4, 5) is None  # the next versions
    assert doubt(3, 4) is None  # v3 committed while the snapshots were read
    assert doubt(2, 3, 4) is None
    assert doubt(5) == "tutor: snapshot v3, adapter-updates continues at v5"
    assert doubt(1, 2) == "tutor: snapshot v3, adapter-updates has no v3"
    assert doubt(3, sha="f" * 64) == "tutor v3: the snapshot's sha256 is not adapter-updates'"
    assert _tail_doubt({}, [_record(_update("new", 1), 0)], verifier) is None
    assert _tail_doubt({}, [_record(_update("new", 4), 0)], verifier) == (
        "new: snapshot v0, adapter-updates continues at v4"
    )


# ── end to end: a compacted topic, a restarted trainer ────────────────────────


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


async def _newest_per_key(bootstrap: str, topic: str) -> dict[bytes, ConsumerRecord[bytes, bytes]]:
    records = await read_all(bootstrap, topic, 1, settle=1.0, isolation_level="read_committed")
    return {r.key: r for r in records if r.key is not None}


async def _snapshots_left(bootstrap: str, topic: str, key: bytes) -> int:
    """How many readable snapshots of ``key`` the log still holds (uncommitted included)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        left = 0
        while await consumer.position(tp) < end:
            for part in (await consumer.getmany(tp, timeout_ms=500)).values():
                for record in part:
                    if record.key == key and record.value and record.value.startswith(b'{"'):
                        left += 1
        return left
    finally:
        await consumer.stop()


@pytest.mark.integration
@pytest.mark.timeout(300)
async def test_a_compacted_garbage_snapshot_rebuilds_from_the_history_and_no_file_changes(
    kafka_bootstrap: str, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lorastream.settings import load_settings
    from lorastream.stages import trainer_config
    from trainer import Trainer

    topics = Topics.named(prefix)
    specs = topic_specs(topics, 1, 1)
    for spec in specs:  # segments that roll at once and a cleaner that compacts them
        if spec.name == topics.adapter_latest:
            spec.topic_configs.update({"segment.ms": "100", "min.cleanable.dirty.ratio": "0.01"})
    await create_topics(KafkaConnection(kafka_bootstrap), specs)
    events = [learning_event("tutor", n) for n in range(12)]
    await produce(
        kafka_bootstrap, topics.learning_events, [(b"tutor", encode(e)) for e in events[:8]]
    )
    adapters = tmp_path / "adapters"
    settings = load_settings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=prefix,
        adapter_dir=str(adapters),
        home=tmp_path / "home",
        window_size=4,
        eval_fraction=0.0,
    )

    async def train_to(last_offset: int) -> Trainer:
        """Run a trainer until tutor's events up to ``last_offset`` are handled."""
        trainer = Trainer(trainer_config(settings))
        async with trainer:
            running = asyncio.create_task(trainer.run())
            tp = TopicPartition(topics.learning_events, 0)

            async def handled() -> bool:
                lineage = trainer.lineages.get("tutor")
                done = lineage is not None and lineage.is_handled(tp, last_offset)
                held = len(trainer.holds) > 0  # refused to write a version again
                return done or held or running.done()

            await wait_for(handled, 150, f"tutor's events up to offset {last_offset}")
            trainer.request_stop()
            await running
        return trainer

    await train_to(7)
    before = _digests(adapters / "tutor")
    assert {p.split("/")[0] for p in before} == {"v1", "v2"}, before

    # Two plain (non-transactional) garbage records under tutor's key, and one under a key
    # that is no adapter's; each in its own segment, so that the cleaner drops the real
    # snapshots and keeps the garbage, as it did in the issue.
    for value in (b"{garbage", b"more garbage"):
        await asyncio.sleep(0.3)
        await produce(kafka_bootstrap, topics.adapter_latest, [(b"tutor", value)])
    await asyncio.sleep(0.3)
    await produce(kafka_bootstrap, topics.adapter_latest, [(b"ghost", b"\xff")])

    async def compacted() -> bool:
        return await _snapshots_left(kafka_bootstrap, topics.adapter_latest, b"tutor") == 0

    await wait_for(compacted, 120, "the log cleaner to drop tutor's real snapshots", interval=2)

    await produce(
        kafka_bootstrap, topics.learning_events, [(b"tutor", encode(e)) for e in events[8:]]
    )
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer = await train_to(11)
    assert trainer.lineages["tutor"].version == 3
    untrusted = [r.getMessage() for r in caplog.records if "cannot be trusted" in r.getMessage()]
    assert len(untrusted) == 1 and "tutor" in untrusted[0], caplog.text

    announced = await read_all(kafka_bootstrap, topics.adapter_updates, 3, settle=1.5)
    versions = [decode(r.value, AdapterUpdate).version for r in announced]
    assert versions == [1, 2, 3], f"a version was announced again: {versions}"
    after = _digests(adapters / "tutor")
    assert {p: d for p, d in after.items() if p.split("/")[0] in ("v1", "v2")} == before, (
        "a file of an announced version changed"
    )
    assert any(p.startswith("v3/") for p in after)

    # The snapshots were written again: tutor's newest is v3, the completion names the
    # garbage under "ghost", and the next start trusts them.
    newest = await _newest_per_key(kafka_bootstrap, topics.adapter_latest)
    assert decode(newest[b"tutor"].value, LineageSnapshot).update.version == 3
    done = orjson.loads(newest[COMPLETE.encode()].value)
    assert done["unreadable"] == [[0, newest[b"ghost"].offset]], done
    log = _log(kafka_bootstrap, topics)
    lineages = await log.refresh()
    assert not log.needs_snapshots and lineages["tutor"].version == 3
    assert len(lineages["tutor"].updates) == 1, "the history was read again"
