"""Replay on the real broker: the live lineage again, bit for bit, under any name, killed or not.

One live lineage is made per module: the trainer, as a real process, trains
``alpha`` v1–v3 from 53 events (with re-delivered duplicates, ``beta``'s
events and an unreadable record on the same partition). Every replay test
retrains it under a new name and compares file for file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import orjson
import pytest
import torch
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from lorastream.dev.events import learning_event
from lorastream.dev.ports import free_port
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import LORASTREAM, Worker, worker_env
from lorastream.ops.admin import create_topics, topic_specs
from schemas import AdapterUpdate, Topics, decode, encode
from tests.kafka_util import read_all, wait_for
from tests.lorastream.test_errors import _run_here
from trainer.kafka import KafkaConnection

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors")


def _stream() -> list[tuple[bytes, bytes]]:
    """alpha's 53 events with duplicates, beta's 10, and one unreadable record keyed alpha."""
    out: list[tuple[bytes, bytes]] = []
    for i in range(53):
        out.append((b"alpha", encode(learning_event("alpha", i))))
        if i < 10:
            out.append((b"beta", encode(learning_event("beta", i))))
        if i in (5, 20, 40):  # re-delivered by an at-least-once scorer
            out.append((b"alpha", encode(learning_event("alpha", i - 3))))
        if i == 30:
            out.append((b"alpha", b"{not json"))
    return out


@dataclass(frozen=True)
class Live:
    bootstrap: str
    prefix: str
    topics: Topics
    home: Path
    adapters: Path
    updates: list[AdapterUpdate]  # alpha v1–v3, as the live trainer announced them

    def env(self, **more: str) -> dict[str, str]:
        return {
            **os.environ,
            **worker_env(
                self.bootstrap,
                self.prefix,
                self.home,
                LORASTREAM_ADAPTER_DIR=str(self.adapters),
                LORASTREAM_EVAL_FRACTION="0",
            ),
            **more,
        }


@pytest.fixture(scope="module")
async def live(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Live:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    root = tmp_path_factory.mktemp("replay")
    topics = await make_topics(kafka_bootstrap, prefix)
    await produce(kafka_bootstrap, topics.learning_events, _stream())
    home, adapters = root / "home", root / "adapters"
    # Evaluation off: the windows and files compared are those of every event, as before.
    env = worker_env(
        kafka_bootstrap,
        prefix,
        home,
        LORASTREAM_ADAPTER_DIR=str(adapters),
        LORASTREAM_EVAL_FRACTION="0",
    )
    with Worker(["train"], env, root / "train.log") as worker:
        records = await read_all(kafka_bootstrap, topics.adapter_updates, 3, timeout=180, settle=2)
        assert worker.alive(), worker.output()
    updates = [decode(r.value, AdapterUpdate) for r in records]
    assert [(u.adapter, u.version) for u in updates] == [("alpha", 1), ("alpha", 2), ("alpha", 3)]
    return Live(kafka_bootstrap, prefix, topics, home, adapters, updates)


def _replay(
    live: Live, *args: str, timeout: float = 180, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LORASTREAM, "replay", *args],
        env=live.env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def _lineage(bootstrap: str, live: Live, name: str, expect: int) -> list[AdapterUpdate]:
    records = await read_all(bootstrap, live.topics.adapter_updates, 3 + expect, settle=1.5)
    return [u for u in (decode(r.value, AdapterUpdate) for r in records) if u.adapter == name]


def _digests(update: AdapterUpdate) -> dict[str, str]:
    directory = Path(urlparse(update.uri).path)
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in FILES}


def _assert_same_lineage(replayed: list[AdapterUpdate], live: Live, name: str) -> None:
    assert [u.version for u in replayed] == [1, 2, 3], "a version is missing or repeated"
    assert [u.parent_version for u in replayed] == [None, 1, 2]
    for mine, theirs in zip(replayed, live.updates, strict=True):
        assert mine.adapter == name
        assert mine.window == theirs.window, "the replay grouped other windows"
        assert mine.sha256 == theirs.sha256
        assert _digests(mine) == _digests(theirs), f"{name} v{mine.version}: files differ"
        assert mine.train_loss == theirs.train_loss
        assert Path(urlparse(mine.uri).path) == live.adapters / name / f"v{mine.version}"


async def test_a_lineage_replayed_into_two_names_is_the_live_one_file_for_file(
    kafka_bootstrap: str, live: Live
) -> None:
    for name in ("alpha-again", "alpha-twice"):
        done = _replay(live, "--adapter", "alpha", "--into", name)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{name}: v1–v3 from 48 events of alpha" in done.stdout, done.stdout
        assert "5 event(s) left in a partial window" in done.stdout
        assert "events" in done.stderr and "windows" in done.stderr  # the progress bar
    for name in ("alpha-again", "alpha-twice"):
        _assert_same_lineage(await _lineage(kafka_bootstrap, live, name, 6), live, name)


async def test_the_live_trainer_and_replay_train_through_one_core(
    kafka_bootstrap: str, tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both drivers hand their windows to WindowTrainer.train, and so make the same files."""
    from lorastream.settings import load_settings
    from lorastream.stages import replay_config, replay_decoder, trainer_config
    from trainer import Replay, Trainer, WindowTrainer

    calls: list[tuple[str, list[str]]] = []
    real_train = WindowTrainer.train

    def spy(self: WindowTrainer, window: object, lineage: object, *group: object) -> object:
        calls.append((lineage.adapter, window.ids))  # type: ignore[attr-defined]
        return real_train(self, window, lineage, *group)  # type: ignore[arg-type]

    monkeypatch.setattr(WindowTrainer, "train", spy)
    topics = await make_topics(kafka_bootstrap, prefix)
    events = [learning_event("solo", n) for n in range(16)]
    await produce(kafka_bootstrap, topics.learning_events, [(b"solo", encode(e)) for e in events])
    settings = load_settings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=prefix,
        adapter_dir=tmp_path / "adapters",
        home=tmp_path / "home",
        eval_fraction=0,  # one window of all 16 events
    )

    trainer = Trainer(trainer_config(settings))
    async with trainer:
        running = asyncio.create_task(trainer.run())
        await wait_for(lambda: _has(trainer, "solo"), 120, "the live trainer's v1")
        trainer.request_stop()
        await running

    config = replay_config(settings, source="solo", target="solo-replayed")
    replay = Replay(config, replay_decoder(settings, "solo", rescore=False))
    core = await asyncio.to_thread(WindowTrainer.load, config.training)
    async with replay.session() as session:
        report = await replay.run(core, session)

    ids = [e.id for e in events]
    assert calls == [("solo", ids), ("solo-replayed", ids)]
    live_update = trainer.lineages["solo"].updates[0]
    assert [t.update.sha256 for t in report.trained] == [live_update.sha256]


async def _has(trainer: object, adapter: str) -> bool:
    lineage = trainer.lineages.get(adapter)  # type: ignore[attr-defined]
    return lineage is not None and lineage.version >= 1


@pytest.mark.parametrize(
    ("stage", "version"),
    [("step", 2), ("commit", 3)],
    ids=["killed-mid-step", "killed-between-files-and-commit"],
)
async def test_a_killed_replay_continues_with_resume_and_announces_each_version_once(
    kafka_bootstrap: str, live: Live, tmp_path: Path, stage: str, version: int
) -> None:
    name = f"alpha-{stage}"
    crashing = Worker(
        ["replay", "--adapter", "alpha", "--into", name],
        {**live.env(), "LORASTREAM_FAULTS": f"pause:{stage}:{name}:{version}"},
        tmp_path / "replay-1.log",
    ).start()
    try:
        await wait_for(
            crashing.said("FAULT paused"), 120, f"the replay to reach {stage} of {name} v{version}"
        )
    finally:
        crashing.kill()

    refused = _replay(live, "--adapter", "alpha", "--into", name)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"ReplayError: {name} already has a lineage (v1–v{version - 1}); add --resume to "
        "continue it, or choose another --into"
    ]
    resumed = _replay(live, "--adapter", "alpha", "--into", name, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {name} at v{version - 1}" in resumed.stderr
    assert f"{name}: v{version}–v3 from" in resumed.stdout, resumed.stdout
    _assert_same_lineage(await _lineage(kafka_bootstrap, live, name, 3), live, name)
    again = _replay(live, "--adapter", "alpha", "--into", name, "--resume")
    assert again.returncode == 0 and "nothing to train" in again.stderr, again.stderr
    assert not list((live.adapters / name).glob(".*")), "temporary directories were left"


async def test_ctrl_c_stops_a_replay_with_one_line_naming_the_resume_command(
    kafka_bootstrap: str, live: Live
) -> None:
    """SIGINT (Ctrl-C, to the whole process group) mid-replay: one line that says how to go
    on, the exact command with --resume, exit 130, no traceback; that command finishes
    the lineage, each version once."""
    name = "alpha-interrupted"
    env = live.env(LORASTREAM_STEPS_PER_WINDOW="40")  # windows slow enough to stop mid-way
    proc = subprocess.Popen(
        [LORASTREAM, "replay", "--adapter", "alpha", "--into", name],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:

        async def first_version() -> bool:
            records = await read_all(kafka_bootstrap, live.topics.adapter_updates, 4, timeout=1)
            return any(decode(r.value, AdapterUpdate).adapter == name for r in records)

        try:
            await wait_for(first_version, 150, f"{name} v1")
        except AssertionError:
            proc.kill()
            raise AssertionError(proc.communicate(timeout=10)) from None
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr
    said = [line for line in stderr.splitlines() if "stopped" in line]
    again = f"lorastream replay --adapter alpha --into {name} --resume"
    assert said == [stderr.strip().splitlines()[-1]], stderr
    assert said[0].endswith(f"continue with --resume: {again}"), said

    resumed = subprocess.run(
        [LORASTREAM, *shlex.split(again)[1:]], env=env, capture_output=True, text=True, timeout=180
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    lineage = await _lineage(kafka_bootstrap, live, name, 3)
    assert [u.version for u in lineage] == [1, 2, 3]


# ── re-scoring ───────────────────────────────────────────────────────────────

GAMMA_TEXTS = [
    "the quick brown fox jumps over the lazy dog near the river bank",
    "students solved every algebra problem on the board before lunch",
    "a warm breeze carried the smell of bread through the open window",
]


def _gamma_results() -> list[dict[str, object]]:
    """Four kinds: identical baselines, half-changed baselines, none, unrelated ones."""
    results: list[dict[str, object]] = []
    for i in range(44):
        text = GAMMA_TEXTS[i % len(GAMMA_TEXTS)]
        words = text.split()
        kind = i % 4
        doc: dict[str, object] = {
            "id": f"gamma-{i:03d}",
            "adapter": "gamma",
            "prompt": f"say something #{i}",
            "response": text,
        }
        if kind == 0:
            doc |= {"baseline": text, "entropy_delta": -0.12}
        elif kind == 1:
            changed = [w if j % 3 else "zz" for j, w in enumerate(words)]
            doc |= {"baseline": " ".join(changed), "entropy_delta": -0.12}
        elif kind == 2:
            doc |= {"entropy_delta": 0.05}
        else:
            doc |= {"baseline": "nothing alike here at all", "entropy_delta": 0.3}
        results.append(doc)
    return results


def _row(table: str, adapter: str) -> list[str]:
    """events, windows, left open: a dry run's row for ``adapter``."""
    row = next(line for line in table.splitlines() if f"│ {adapter} " in line)
    return [cell.strip() for cell in row.split("│")[2:5]]


def _qualifies(doc: dict[str, object], rouge_threshold: float) -> bool:
    """The scoring rule, written here from the contract with the rouge-score package itself."""
    from rouge_score import rouge_scorer

    baseline = doc.get("baseline")
    rouge = (
        rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        .score(str(baseline), str(doc["response"]))["rougeL"]
        .fmeasure
        if baseline is not None
        else 0.0
    )
    delta = float(doc["entropy_delta"])  # type: ignore[arg-type]
    return (rouge > rouge_threshold and delta < -0.1) or abs(delta) > 0.15


async def test_rescore_trains_exactly_the_events_a_lower_threshold_qualifies(
    kafka_bootstrap: str, live: Live
) -> None:
    results = _gamma_results()
    await produce(
        kafka_bootstrap,
        live.topics.generation_results,
        [(b"gamma", orjson.dumps(doc)) for doc in results] + [(b"gamma", b"not json")],
    )
    expected = [str(d["id"]) for d in results if _qualifies(d, 0.5)]
    by_default = [str(d["id"]) for d in results if _qualifies(d, 0.7)]
    assert len(expected) > len(by_default), "the data must tell the two thresholds apart"

    plan = _replay(live, "--adapter", "gamma", "--rescore", "--rouge-threshold", "0.5", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert _row(plan.stdout, "gamma") == [
        str(len(expected)),
        str(len(expected) // 16),
        str(len(expected) % 16),
    ]
    assert "1 unreadable" in plan.stdout

    windows, left = divmod(len(expected), 4)
    done = _replay(
        live,
        "--adapter",
        "gamma",
        "--into",
        "gamma-low",
        "--rescore",
        "--rouge-threshold",
        "0.5",
        "--window-size",
        "4",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lineage = await _lineage(kafka_bootstrap, live, "gamma-low", windows)
    assert [u.version for u in lineage] == list(range(1, windows + 1))
    trained = [i for u in lineage for i in u.window.event_ids]
    assert trained == expected[: windows * 4]
    assert {u.window.topic for u in lineage} == {live.topics.generation_results}
    assert f"{left} event(s) left in a partial window" in done.stdout


# ── another base model ───────────────────────────────────────────────────────


async def test_a_replay_onto_another_base_model_records_it_and_loads_on_it(
    kafka_bootstrap: str, live: Live, tmp_path: Path
) -> None:
    from peft import PeftModel

    from trainer.model import build_tiny_model_dir, load_base_model

    other = build_tiny_model_dir(tmp_path / "tiny-seed1", seed=1)
    done = _replay(live, "--adapter", "alpha", "--into", "alpha-on-1", "--base-model", str(other))
    assert done.returncode == 0, done.stdout + done.stderr
    lineage = await _lineage(kafka_bootstrap, live, "alpha-on-1", 3)
    fingerprint = load_base_model(other, torch.device("cpu")).fingerprint
    assert fingerprint != live.updates[0].base_model_fingerprint
    assert [u.version for u in lineage] == [1, 2, 3]
    for mine, theirs in zip(lineage, live.updates, strict=True):
        assert mine.base_model == str(other) and mine.base_model_fingerprint == fingerprint
        assert mine.window == theirs.window and mine.sha256 != theirs.sha256
        base = load_base_model(other, torch.device("cpu"))
        model = PeftModel.from_pretrained(base.model, Path(urlparse(mine.uri).path))
        assert any("lora_A" in n for n, _ in model.named_parameters())


# ── errors: one line, exit 1 ─────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--adapter", "nobody", "--into", "x"], "ReplayError: unknown adapter nobody: "),
        (
            ["--adapter", "alpha", "--into", "x", "--from", "100000"],
            "ReplayError: adapter alpha has no events in ",
        ),
        (
            ["--adapter", "alpha", "--into", "x", "--to", "2000-01-01T00:00:00Z"],
            "ReplayError: adapter alpha has no events in ",
        ),
        (["--adapter", "alpha", "--into", "x", "--from", "yesterday"], "ReplayError: --from "),
        (
            ["--adapter", "alpha", "--into", "x", "--from", "9", "--to", "3"],
            "ReplayError: --to 3 is before --from 9",
        ),
        (["--adapter", "alpha", "--into", "alpha"], "ReplayError: --into alpha is the adapter"),
        (["--adapter", "alpha"], "ReplayError: --into NEW is required"),
        (["--adapter", "alpha", "--into", "../x"], "ReplayError: --into '../x' is not"),
        (
            ["--adapter", "alpha", "--into", "x", "--base-model", "/nonexistent/model"],
            "BaseModelError: base model /nonexistent/model is not a Hugging Face model",
        ),
    ],
    ids=[
        "unknown-adapter",
        "empty-offset-range",
        "empty-time-range",
        "bad-bound",
        "reversed-range",
        "into-itself",
        "no-into",
        "bad-name",
        "base-model-missing",
    ],
)
def test_a_replay_that_cannot_run_says_why_in_one_line(
    live: Live, args: list[str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In this process, as the script runs it (a process of its own per case cost seconds
    # each of imports; the closed-pipe and signal walks keep the script's own path).
    done = _run_here(["replay", *args], live.env(), monkeypatch)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), done.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["replay", "--adapter", "alpha", "--into", "x"],
        ["adapters", "list"],
        ["adapters", "follow"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_with_the_broker_down_a_command_names_the_servers_in_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    servers = f"127.0.0.1:{free_port()}"  # nothing listens there: connections are refused
    started = time.monotonic()
    done = subprocess.run(
        [LORASTREAM, *command],
        env={
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": servers,
            "LORASTREAM_HOME": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("KafkaUnavailableError: ") and servers in lines[0]
    assert time.monotonic() - started < 30


# ── ranges: times, and what the cluster no longer keeps ──────────────────────


async def test_time_ranges_and_offsets_the_cluster_dropped(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = Topics.named(prefix)
    await create_topics(
        KafkaConnection(kafka_bootstrap), topic_specs(topics, 1, 1, history_retention_ms=3_600_000)
    )
    t0 = datetime.now(tz=UTC).replace(microsecond=0) - timedelta(minutes=10)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for n in range(40):
            stamp = int((t0 + timedelta(seconds=n)).timestamp() * 1000)
            await producer.send_and_wait(
                topics.learning_events,
                encode(learning_event("delta", n)),
                b"delta",
                timestamp_ms=stamp,
            )
    finally:
        await producer.stop()
    env = {
        **os.environ,
        **worker_env(
            kafka_bootstrap,
            prefix,
            tmp_path,
            LORASTREAM_ADAPTER_DIR=str(tmp_path),
            LORASTREAM_EVAL_FRACTION="0",
        ),
    }

    def replay(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [LORASTREAM, "replay", "--adapter", "delta", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def counts(done: subprocess.CompletedProcess[str]) -> list[str]:
        assert done.returncode == 0, done.stderr
        return _row(done.stdout, "delta")

    since = (t0 + timedelta(seconds=10)).isoformat().replace("+00:00", "Z")
    until = (t0 + timedelta(seconds=29)).isoformat()
    assert counts(replay("--dry-run", "--from", since, "--to", until)) == ["20", "1", "4"]
    assert counts(replay("--dry-run", "--from", "3", "--to", "18")) == ["16", "1", "0"]

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(topics.learning_events, 0): RecordsToDelete(5)})
    finally:
        await admin.close()

    gone = replay("--into", "delta-r", "--from", "2")
    assert gone.returncode == 1
    assert gone.stderr.strip().splitlines() == [
        f"ReplayError: the range starts before what Kafka retains: {topics.learning_events}[0] "
        "offsets 2..4 (the log now starts at 5) are gone ({} has retention.ms=3600000 (1 hour)); "
        "replay from --from 5 or later".format(topics.learning_events)
    ]
    early = (t0 - timedelta(seconds=30)).isoformat()
    assert replay("--into", "delta-r", "--from", early).returncode == 1
    noted = replay("--dry-run")
    assert counts(noted) == ["35", "2", "3"]
    assert "offsets 0..4 (the log now starts at 5) are no longer retained" in noted.stderr
