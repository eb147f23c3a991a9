"""Many adapters per step in the live trainer, on the real broker (#24): windows that close
in one batch step together and commit in one transaction, a window that fails in its group
is quarantined alone, and a replay or a repair of a lineage trained in groups is bit for bit
the live one."""

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
from tests.kafka_util import read_all

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

    # Cyrus's second window makes a NaN loss: it is tried again alone, and quarantined.
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
    assert "(one step with 2 other adapters)" in trainer.output()
    # One transaction per group: its announcements are consecutive records, where between
    # two transactions the broker writes a commit marker (an offset no reader sees).
    offsets: dict[str, list[int]] = {}
    for record, update in zip(records, updates, strict=True):
        group = update.window.group
        assert group is not None, f"{update.adapter} v{update.version} was stepped alone"
        assert update.adapter in group.adapters and set(group.adapters) == set(NAMES)
        assert len(group.rows[group.adapters.index(update.adapter)]) == SIZE
        offsets.setdefault(group.model_dump_json(), []).append(record.offset)
    assert sorted(len(o) for o in offsets.values()) == [2, 3]  # cyrus v2 was quarantined
    for run in offsets.values():
        assert run == list(range(run[0], run[0] + len(run))), offsets
    first, second = sorted(offsets.values())
    assert second[0] > first[-1] + 1 or first[0] > second[-1] + 1, offsets

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

    # A repair rebuilds a version trained in a group as it was: bit for bit, or not at all.
    optimizer = Path(urlparse(live[0].uri).path) / "optimizer.safetensors"
    announced = optimizer.read_bytes()
    optimizer.write_bytes(announced[:-4] + b"\0\0\0\0")
    repaired = subprocess.run(
        [LORASTREAM, "adapters", "repair", "bo"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "restored v1 as announced" in repaired.stdout, repaired.stdout
    assert optimizer.read_bytes() == announced
