"""Rehearsal on the real broker and a real S3 store, with real processes: the same samples
after a SIGKILL, in a second trainer with an empty cache, and in a replay into a new name.

The buffer is small (8) beside windows of 16, so the reservoir replaces events from the
second window on, and each step rehearses 4 of its parent's buffer. Every file of every
version (the rehearsal buffer included) must be the uninterrupted lineage's, bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition

from lorastream.dev.events import learning_event
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import LORASTREAM, Worker, worker_env
from schemas import AdapterUpdate, LearningEvent, RehearsalSpec, Topics, decode, encode
from tests.kafka_util import read_all, wait_for
from trainer.objects import fetch_version
from trainer.rehearsal import decode_buffer, sample, sample_digest
from trainer.store import REHEARSAL_FILE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

K, SIZE = 4, 8
REHEARSAL = {"LORASTREAM_REHEARSAL": str(K), "LORASTREAM_REHEARSAL_BUFFER": str(SIZE)}
FILES = ("adapter_model.safetensors", "optimizer.safetensors", REHEARSAL_FILE)


def _stream() -> list[LearningEvent]:
    """alpha's 53 events, three of them delivered twice (an at-least-once scorer)."""
    out = []
    for i in range(53):
        out.append(learning_event("alpha", i))
        if i in (5, 20, 40):
            out.append(learning_event("alpha", i - 3))
    return out


@dataclass(frozen=True)
class Live:
    """alpha v1–v3 on S3, trained by a trainer killed mid-step on v2 and a second one."""

    prefix: str
    topics: Topics
    root: Path
    env: dict[str, str]
    updates: list[AdapterUpdate]


@pytest.fixture(scope="module")
async def live(kafka_bootstrap: str, s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Live:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    root = tmp_path_factory.mktemp("rehearsal")
    topics = await make_topics(kafka_bootstrap, prefix)
    await produce(
        kafka_bootstrap, topics.learning_events, [(b"alpha", encode(e)) for e in _stream()]
    )
    env = {
        **worker_env(
            kafka_bootstrap,
            prefix,
            root / "home",
            LORASTREAM_ADAPTER_DIR=f"{s3.bucket('rehearsal')}/{prefix.rstrip('.')}",
            **REHEARSAL,
        ),
        **s3.environment(),
    }
    crashing = Worker(
        ["train"],
        {
            **env,
            "LORASTREAM_INSTANCE_ID": "a",
            "LORASTREAM_ADAPTER_CACHE": str(root / "cache-a"),
            "LORASTREAM_FAULTS": "pause:step:alpha:2",
        },
        root / "a.log",
    ).start()
    try:
        await wait_for(crashing.said("FAULT paused"), 120, "trainer a to reach the step of v2")
    finally:
        crashing.kill()
    # Another machine: its own, empty cache; v1 and its buffer come from the bucket alone.
    second = {**env, "LORASTREAM_INSTANCE_ID": "b", "LORASTREAM_ADAPTER_CACHE": str(root / "b")}
    with Worker(["train"], second, root / "b.log") as worker:
        records = await read_all(kafka_bootstrap, topics.adapter_updates, 3, timeout=180, settle=2)
        assert worker.alive(), worker.output()
    assert "alpha v2:" in worker.output(), "trainer b did not train v2; nothing was taken over"
    updates = [decode(r.value, AdapterUpdate) for r in records]
    assert [(u.adapter, u.version) for u in updates] == [("alpha", 1), ("alpha", 2), ("alpha", 3)]
    return Live(prefix, topics, root, env, updates)


def _digests(update: AdapterUpdate, cache: Path) -> dict[str, str]:
    directory = fetch_version(update.uri, cache)  # every file checked against the manifest
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in FILES}


def _reference(home: Path, root: Path) -> list[tuple[dict[str, str], RehearsalSpec | None]]:
    """alpha v1–v3 trained in this process, uninterrupted: each version's digests and
    what its step rehearsed."""
    from trainer.config import TrainingConfig
    from trainer.core import Trained, WindowTrainer
    from trainer.lineage import Lineage
    from trainer.model import default_tiny_model_dir
    from trainer.window import Windows

    model = default_tiny_model_dir(home)
    config = TrainingConfig(
        adapter_dir=root,
        base_model=model,
        base_model_name=str(model.resolve()),
        device="cpu",
        rehearsal=K,
        rehearsal_buffer=SIZE,
    )
    core = WindowTrainer.load(config)
    lineage, windows = Lineage("alpha"), Windows(16)
    out: list[tuple[dict[str, str], RehearsalSpec | None]] = []
    tp = TopicPartition("learning-events", 0)
    for offset in range(48):
        _, closed = windows.offer(tp, offset, learning_event("alpha", offset), lineage)
        if closed is not None:
            outcome = core.train(closed, lineage)
            assert isinstance(outcome, Trained)
            lineage.record(outcome.update)
            windows.settle(closed)
            directory = root / "alpha" / f"v{lineage.version}"
            digests = {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in FILES}
            out.append((digests, outcome.update.rehearsal))
    return out


async def test_a_sigkill_and_a_takeover_with_an_empty_cache_rehearse_the_same_events(
    live: Live, s3_env: Any, tmp_path: Path
) -> None:
    reference = _reference(live.root / "home", tmp_path / "reference")
    cache = tmp_path / "fetched"
    for update, (digests, rehearsed) in zip(live.updates, reference, strict=True):
        assert _digests(update, cache) == digests, f"alpha v{update.version} differs"
        assert update.rehearsal == rehearsed
    # What each step announces it rehearsed is the sample of its parent's buffer.
    for parent, update in zip(live.updates, live.updates[1:], strict=False):
        path = fetch_version(parent.uri, cache) / REHEARSAL_FILE
        drawn = sample(decode_buffer(path.read_bytes(), str(path)), K, 0, update.version)
        assert update.rehearsal is not None and update.rehearsal.events == K
        assert update.rehearsal.digest == sample_digest(drawn)


async def test_a_replay_into_a_new_name_rehearses_the_same_events(
    kafka_bootstrap: str, live: Live, s3_env: Any, tmp_path: Path
) -> None:
    done = subprocess.run(
        [LORASTREAM, "replay", "--adapter", "alpha", "--into", "alpha-again"],
        env={**os.environ, **live.env, "LORASTREAM_ADAPTER_CACHE": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    records = await read_all(kafka_bootstrap, live.topics.adapter_updates, 6, settle=1.5)
    replayed = [
        u for u in (decode(r.value, AdapterUpdate) for r in records) if u.adapter == "alpha-again"
    ]
    assert [u.version for u in replayed] == [1, 2, 3]
    cache = tmp_path / "fetched"
    for mine, theirs in zip(replayed, live.updates, strict=True):
        assert mine.window == theirs.window
        assert mine.rehearsal == theirs.rehearsal
        assert _digests(mine, cache) == _digests(theirs, cache), f"v{mine.version} differs"
