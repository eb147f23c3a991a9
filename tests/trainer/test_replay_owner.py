"""A lineage has one writer: ``replay --into`` refuses a name that the live pipeline owns.

A name is the live pipeline's when ``learning-events`` holds events keyed by it, or
when ``adapter-updates`` holds records of it not written by a replay into it (the
``lorastream-writer`` header names each record's transactional id). ``--resume``
continues only a lineage that the replay itself made (issue #20, part 3).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from lorastream.dev.events import learning_event
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import LORASTREAM, worker_env
from schemas import AdapterUpdate, Topics, decode, encode
from tests.kafka_util import read_all, wait_for
from tests.lorastream.test_errors import _run_here
from trainer.committed import first_keyed
from trainer.kafka import KafkaConnection

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _env(bootstrap: str, prefix: str, tmp_path: Path) -> dict[str, str]:
    return worker_env(
        bootstrap,
        prefix,
        tmp_path / "home",
        LORASTREAM_ADAPTER_DIR=str(tmp_path / "adapters"),
        LORASTREAM_WINDOW_SIZE="4",
    )


def _replay(
    bootstrap: str, prefix: str, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **_env(bootstrap, prefix, tmp_path)}
    return subprocess.run(
        [LORASTREAM, "replay", *args], env=env, capture_output=True, text=True, timeout=180
    )


async def _train_live(bootstrap: str, prefix: str, tmp_path: Path, topics: Topics) -> None:
    """The live trainer, in this process, until tutor v1 is announced."""
    from lorastream.settings import load_settings
    from lorastream.stages import trainer_config
    from trainer import Trainer

    settings = load_settings(
        bootstrap_servers=bootstrap,
        topic_prefix=prefix,
        adapter_dir=str(tmp_path / "adapters"),
        home=tmp_path / "home",
        window_size=4,
        eval_fraction=0.0,
        instance_id="0",  # the writer the refusal names
    )
    trainer = Trainer(trainer_config(settings))
    async with trainer:
        running = asyncio.create_task(trainer.run())

        async def announced() -> bool:
            lineage = trainer.lineages.get("tutor")
            return (lineage is not None and lineage.version >= 1) or running.done()

        await wait_for(announced, 150, "the live trainer's tutor v1")
        trainer.request_stop()
        await running


def test_replay_into_a_live_name_is_refused_and_its_own_lineage_resumes(
    kafka_bootstrap: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a coroutine: the refusals run in this process, as the script runs them (a process
    # each cost seconds of imports), and a command runs its own event loop.
    topics = asyncio.run(make_topics(kafka_bootstrap, prefix))
    # alpha: 16 events to replay (offsets 0–15), and tutor: the live trainer trains both.
    asyncio.run(
        produce(
            kafka_bootstrap,
            topics.learning_events,
            [(b"alpha", encode(learning_event("alpha", n))) for n in range(16)]
            + [(b"tutor", encode(learning_event("tutor", n))) for n in range(4)],
        )
    )
    asyncio.run(_train_live(kafka_bootstrap, prefix, tmp_path, topics))
    live_files = sorted((tmp_path / "adapters" / "tutor").rglob("*"))
    env = _env(kafka_bootstrap, prefix, tmp_path)

    def refused(*args: str) -> str:
        done = _run_here(["replay", "--adapter", "alpha", *args], env, monkeypatch)
        assert done.returncode == 1, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        return lines[0]

    # The case: --resume into the live trainer's name; and a plain --into too.
    for args in (["--into", "tutor", "--resume"], ["--into", "tutor"]):
        line = refused(*args)
        assert line == (
            f"ReplayError: --into tutor is an adapter the live pipeline owns: its records on "
            f"{topics.adapter_updates} were written by {prefix}lorastream-trainer-0, not by a "
            "replay into tutor; choose another --into"
        ), line
    assert sorted((tmp_path / "adapters" / "tutor").rglob("*")) == live_files

    # A name with events on learning-events and no version yet is the live pipeline's too.
    asyncio.run(
        produce(
            kafka_bootstrap,
            topics.learning_events,
            [(b"coach", encode(learning_event("coach", 0)))],
        )
    )
    line = refused("--into", "coach")
    assert line == (
        f"ReplayError: --into coach is an adapter the live pipeline owns: "
        f"{topics.learning_events}[0]@20 is an event of it, which the live trainer would "
        "train; choose another --into"
    ), line

    # An announcement from before writers named themselves is not a replay's either.
    old = asyncio.run(read_all(kafka_bootstrap, topics.adapter_updates, 1))
    stale = decode(old[0].value, AdapterUpdate).model_copy(update={"adapter": "legacy"})
    asyncio.run(produce(kafka_bootstrap, topics.adapter_updates, [(b"legacy", encode(stale))]))
    line = refused("--into", "legacy", "--resume")
    assert "a writer that did not name itself (no lorastream-writer header)" in line, line

    # A lineage that a replay made is its own: --resume continues it.
    first = _replay(
        kafka_bootstrap, prefix, tmp_path, "--adapter", "alpha", "--into", "alpha-r", "--to", "7"
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "alpha-r: v1–v2 from 8 events of alpha" in first.stdout, first.stdout
    again = _replay(
        kafka_bootstrap, prefix, tmp_path, "--adapter", "alpha", "--into", "alpha-r", "--resume"
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming alpha-r at v2" in again.stderr, again.stderr
    assert "alpha-r: v3–v4 from 8 events of alpha" in again.stdout, again.stdout
    records = asyncio.run(read_all(kafka_bootstrap, topics.adapter_updates, 6))
    writers = {
        (decode(r.value, AdapterUpdate).adapter, dict(r.headers).get("lorastream-writer"))
        for r in records
    }
    assert writers == {
        ("alpha", f"{prefix}lorastream-trainer-0".encode()),  # the live trainer's too
        ("tutor", f"{prefix}lorastream-trainer-0".encode()),
        ("legacy", None),
        ("alpha-r", f"{prefix}lorastream-replay-alpha-r".encode()),
    }, writers


async def test_first_keyed_reads_the_partition_the_key_hashes_to(
    kafka_bootstrap: str, prefix: str
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix, partitions=3)
    names = [f"adapter-{n}" for n in range(12)]
    sent = await produce(
        kafka_bootstrap,
        topics.learning_events,
        [(name.encode(), encode(learning_event(name, 0))) for name in names],
    )
    assert len({m.partition for m in sent}) > 1, "the names should spread over partitions"
    for name, meta in zip(names, sent, strict=True):
        found = await first_keyed(KafkaConnection(kafka_bootstrap), topics.learning_events, name)
        assert found is not None and found.key == name.encode()
        assert TopicPartition(found.topic, found.partition) == TopicPartition(
            meta.topic, meta.partition
        )
    assert (
        await first_keyed(KafkaConnection(kafka_bootstrap), topics.learning_events, "nobody")
        is None
    )
