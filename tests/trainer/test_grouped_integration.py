"""Many adapters per step in the live trainer, on the real broker (#24): windows that close
in one batch step together and commit in one transaction, a window that fails in its group
is quarantined alone, and a replay of a lineage trained in groups is bit for bit the live one."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest

from lorastream.dev.events import learning_event
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import LORASTREAM, Worker, worker_env
from schemas import AdapterUpdate, QuarantineRecord, decode, encode
from tests.kafka_util import read_all, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

NAMES = ("ada", "bo", "cyrus")
SIZE = 4
FILES = ("adapter_model.safetensors", "optimizer.safetensors")


def _events() -> list[tuple[bytes, bytes]]:
    """Two windows of each adapter, interleaved: each adapter's texts of its own lengths."""
    out = []
    for n in range(2 * SIZE):
        for name in NAMES:
            pair = (f"{name} asks {n}: " + "why " * (n % 3 + len(name)), f"{name} says {n}")
            out.append((name.encode(), encode(learning_event(name, n, pair=pair))))
    return out


def _digests(update: AdapterUpdate) -> dict[str, str]:
    directory = Path(urlparse(update.uri).path)
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in FILES}


async def test_windows_closed_together_step_together_commit_together_and_replay_bit_for_bit(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    await produce(kafka_bootstrap, topics.learning_events, _events())
    env = worker_env(
        kafka_bootstrap,
        prefix,
        tmp_path / "home",
        LORASTREAM_ADAPTER_DIR=str(tmp_path / "adapters"),
        LORASTREAM_WINDOW_SIZE=str(SIZE),
        LORASTREAM_ADAPTERS_PER_STEP="3",
        LORASTREAM_INSTANCE_ID="grouped",
    )

    # One transaction: paused inside bo v1's, none of the group's versions can be read.
    paused = Worker(
        ["train"], {**env, "LORASTREAM_FAULTS": "pause:commit-inside:bo:1"}, tmp_path / "p.log"
    ).start()
    try:
        await wait_for(paused.said("FAULT paused at commit-inside bo v1"), 150, "bo v1's commit")
        assert await read_all(kafka_bootstrap, topics.adapter_updates, 0, settle=1) == []
    finally:
        paused.kill()

    # The same instance id again: its start aborts the paused transaction, and it trains
    # all, but for cyrus's second window, which makes a NaN loss, alone.
    poison = {"LORASTREAM_FAULTS": "nan:cyrus-005", "LORASTREAM_MAX_TRIES": "2"}
    with Worker(["train"], {**env, **poison}, tmp_path / "train.log") as trainer:
        records = await read_all(kafka_bootstrap, topics.adapter_updates, 5, timeout=150)
        quarantined = await read_all(kafka_bootstrap, topics.quarantine, 1, timeout=60)
        assert trainer.alive(), trainer.output()
    updates = [decode(r.value, AdapterUpdate) for r in records]
    assert sorted((u.adapter, u.version) for u in updates) == [
        ("ada", 1),
        ("ada", 2),
        ("bo", 1),
        ("bo", 2),
        ("cyrus", 1),
    ]
    (failed,) = [decode(r.value, QuarantineRecord) for r in quarantined]
    assert failed.adapter == "cyrus" and "cyrus-005" in [e.id for e in failed.events]
    assert failed.tries == 2 and "NonFiniteLossError" in failed.error
    grouped = [u for u in updates if u.window.group is not None]
    assert grouped, f"no window was stepped with others:\n{trainer.output()}"
    for update in grouped:
        group = update.window.group
        assert group is not None and update.adapter in group.adapters
        assert set(group.adapters) <= set(NAMES) and len(group.rows) == len(group.adapters)
        assert group.rows[group.adapters.index(update.adapter)]  # its own rows, recorded
    assert "(one step with 2 other adapters)" in trainer.output()

    # A replay of a lineage trained in groups: the same files, bit for bit.
    done = subprocess.run(
        [LORASTREAM, "replay", "--adapter", "bo", "--into", "bo-again"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    records = await read_all(kafka_bootstrap, topics.adapter_updates, 7, settle=1)
    again = [decode(r.value, AdapterUpdate) for r in records]
    live = sorted((u for u in again if u.adapter == "bo"), key=lambda u: u.version)
    replayed = sorted((u for u in again if u.adapter == "bo-again"), key=lambda u: u.version)
    assert [u.version for u in replayed] == [1, 2]
    for mine, theirs in zip(replayed, live, strict=True):
        assert mine.window.event_ids == theirs.window.event_ids
        theirs_group = theirs.window.group
        assert mine.window.group == (theirs_group and theirs_group.named("bo", "bo-again"))
        assert mine.sha256 == theirs.sha256
        assert _digests(mine) == _digests(theirs), f"bo-again v{mine.version}: files differ"
        assert mine.train_loss == theirs.train_loss
