"""A resume from one snapshot per adapter: the same lineage state as the whole history.

The snapshot keeps what a trainer needs (the newest version, the handled
offsets, the ids of the newest windows); a start reads the snapshots, never the
history, once the topic is complete; a pipeline from before the topic is read
in full once and completed.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from lorastream.dev.events import learning_event
from lorastream.dev.topics import make_topics, produce
from schemas import AdapterUpdate, LoraSpec, WindowSpec, encode
from tests.kafka_util import read_all, wait_for
from trainer.history import LineageLog, load_lineages
from trainer.kafka import KafkaConnection
from trainer.lineage import RECENT_WINDOWS, Lineage
from trainer.snapshot import COMPLETE, lineage_of, snapshot_of

TP = TopicPartition("learning-events", 0)


def _update(adapter: str, version: int, first: int) -> AdapterUpdate:
    """Version ``version`` of ``adapter``: a window of 4 events from offset ``first``."""
    return AdapterUpdate(
        adapter=adapter,
        version=version,
        parent_version=version - 1 or None,
        base_model="/models/base",
        uri=f"/adapters/{adapter}/v{version}",
        sha256=f"{version:064x}",
        lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj"]),
        window=WindowSpec(
            topic="learning-events",
            partition=0,
            first_offset=first,
            last_offset=first + 3,
            size=4,
            event_ids=[f"{adapter}-{first + n}" for n in range(4)],
        ),
        train_loss=2.0,
        created_at=datetime(2026, 11, 28, tzinfo=UTC),
    )


def test_a_lineage_from_its_snapshot_admits_and_refuses_what_the_full_one_does() -> None:
    full = Lineage("tutor")
    for version in range(1, 13):
        full.record_update(_update("tutor", version, 4 * (version - 1)))
    resumed = lineage_of(snapshot_of(full))
    assert resumed.version == full.version == 12 and resumed.latest == full.latest
    assert resumed.handled == full.handled
    assert len(resumed.recent_windows) == RECENT_WINDOWS
    # Re-read offsets are handled; ids of the newest windows are recognised at new offsets.
    for offset in (0, 20, 47):
        assert not resumed.admits(TP, offset, "x")
    newest = full.updates[-1].window.event_ids[0]
    assert not resumed.admits(TP, 1000, newest) and not full.admits(TP, 1000, newest)
    assert resumed.admits(TP, 48, "tutor-new") and full.admits(TP, 48, "tutor-new")
    # The snapshot written with version 13 is the lineage once 13 is recorded.
    thirteen = _update("tutor", 13, 48)
    ahead = snapshot_of(full, thirteen)
    full.record_update(thirteen)
    assert ahead == snapshot_of(full)


@pytest.mark.integration
@pytest.mark.timeout(240)
async def test_a_trainer_completes_the_snapshots_and_a_start_reads_them_not_the_history(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    """A pipeline with history but no snapshots (from before them): the trainer reads it
    all once, writes a snapshot per adapter and the completion record, then one with each
    version; a later start's lineages come from the snapshots alone."""
    from lorastream.settings import load_settings
    from lorastream.stages import trainer_config
    from trainer import Trainer

    topics = await make_topics(kafka_bootstrap, prefix)
    # Under the trainer's LORASTREAM_ADAPTER_DIR: a reader skips an announcement of files
    # elsewhere (trainer.signing).
    old = [
        _update("legacy", v, 4 * (v - 1)).model_copy(
            update={"uri": str(tmp_path / "adapters" / "legacy" / f"v{v}")}
        )
        for v in range(1, 4)
    ]
    await produce(kafka_bootstrap, topics.adapter_updates, [(b"legacy", encode(u)) for u in old])
    events = [learning_event("tutor", n) for n in range(8)]
    await produce(kafka_bootstrap, topics.learning_events, [(b"tutor", encode(e)) for e in events])

    settings = load_settings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=prefix,
        adapter_dir=str(tmp_path / "adapters"),
        home=tmp_path / "home",
        window_size=4,
        eval_fraction=0.0,  # every event trains: two windows of four
    )
    trainer = Trainer(trainer_config(settings))
    async with trainer:
        running = asyncio.create_task(trainer.run())

        async def trained() -> bool:
            lineage = trainer.lineages.get("tutor")
            return lineage is not None and lineage.version == 2

        await wait_for(trained, 120, "tutor v2")
        trainer.request_stop()
        await running

    latest = await read_all(kafka_bootstrap, topics.adapter_latest, 4)
    keys = [r.key for r in latest]
    assert keys[:2] == [b"legacy", COMPLETE.encode()], keys  # the completion, first
    assert keys[2:] == [b"tutor", b"tutor"], keys  # then one with each version

    full = await load_lineages(
        KafkaConnection(kafka_bootstrap), topics.adapter_updates, topics.quarantine
    )
    log = LineageLog(
        KafkaConnection(kafka_bootstrap),
        topics.adapter_updates,
        topics.quarantine,
        latest_topic=topics.adapter_latest,
    )
    resumed = await log.refresh()
    assert not log.needs_snapshots
    assert sorted(resumed) == sorted(full) == ["legacy", "tutor"]
    for adapter in full:
        assert resumed[adapter].latest == full[adapter].latest
        assert resumed[adapter].handled == full[adapter].handled
        assert len(resumed[adapter].updates) == 1, "the history was read"
    assert len(full["legacy"].updates) == 3
