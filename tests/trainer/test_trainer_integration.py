"""The trainer end to end on the real broker, as a real process, crashes included.

53 learning events for ``alpha`` and 32 for ``beta`` (interleaved on one
partition, with re-delivered duplicates as the at-least-once scorer makes
them) must give exactly alpha v1–v3 and beta v1–v2, however the trainer is
killed along the way.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlparse

import orjson
import pytest
import torch
from aiokafka import AIOKafkaConsumer, TopicPartition
from safetensors.torch import load_file

from lorastream.dev.events import PAIRS, learning_event
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import LORASTREAM, Worker, worker_env
from schemas import AdapterUpdate, LearningEvent, Topics, decode, encode
from tests.kafka_util import read_all, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def _stream() -> list[LearningEvent]:
    """alpha and beta interleaved, with duplicates of already-sent events mixed in."""
    alpha = [learning_event("alpha", n) for n in range(53)]
    beta = [learning_event("beta", n) for n in range(32)]
    out: list[LearningEvent] = []
    for i in range(53):
        out.append(alpha[i])
        if i < 32:
            out.append(beta[i])
        if i in (5, 20, 40):  # the scorer re-delivered these after a restart
            out.append(alpha[i - 3])
        if i in (6, 20, 31):
            out.append(beta[i - 4])
    return out


EXPECTED = {
    "alpha": [[f"alpha-{n:03d}" for n in range(w * 16, w * 16 + 16)] for w in range(3)],
    "beta": [[f"beta-{n:03d}" for n in range(w * 16, w * 16 + 16)] for w in range(2)],
}


async def _setup(bootstrap: str, prefix: str) -> Topics:
    topics = await make_topics(bootstrap, prefix)
    events = _stream()
    await produce(
        bootstrap, topics.learning_events, [(e.adapter.encode(), encode(e)) for e in events]
    )
    return topics


def _env(bootstrap: str, prefix: str, home: Path, adapters: Path, **more: str) -> dict[str, str]:
    # Evaluation off: the expected windows (and the reference digests) hold every event.
    return worker_env(
        bootstrap,
        prefix,
        home,
        LORASTREAM_ADAPTER_DIR=str(adapters),
        LORASTREAM_EVAL_FRACTION="0",
        **more,
    )


async def _updates(
    bootstrap: str, topics: Topics, expect: int, timeout: float = 180
) -> list[AdapterUpdate]:
    records = await read_all(bootstrap, topics.adapter_updates, expect, timeout=timeout, settle=3)
    return [decode(r.value, AdapterUpdate) for r in records]


@pytest.fixture(scope="session")
def reference(home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], str]:
    """sha256 of every expected version, trained in this process without Kafka or crashes.

    The trainer is deterministic on the CPU, so a lineage that survived SIGKILLs
    and re-read windows must match this one bit for bit: any window trained
    twice, skipped, or resumed from the wrong state would change the weights.
    """
    from trainer.config import LoraSettings
    from trainer.lora import LoraStepper
    from trainer.model import default_tiny_model_dir, load_base_model
    from trainer.store import AdapterStore

    store = AdapterStore(tmp_path_factory.mktemp("reference"))
    digests = {}
    for adapter, windows in EXPECTED.items():
        base = load_base_model(default_tiny_model_dir(home), torch.device("cpu"))
        stepper = LoraStepper(base, LoraSettings(), seed=0)
        state = stepper.initial_state()
        for version, ids in enumerate(windows, start=1):
            examples = [PAIRS[int(i.rsplit("-", 1)[1]) % len(PAIRS)] for i in ids]
            state = stepper.step(state, examples).state
            digests[adapter, version] = store.write(adapter, version, state, stepper, {}).sha256
    return digests


def _check_lineages(
    updates: list[AdapterUpdate], reference: dict[tuple[str, int], str]
) -> dict[str, list[AdapterUpdate]]:
    by_adapter: dict[str, list[AdapterUpdate]] = defaultdict(list)
    for update in updates:
        by_adapter[update.adapter].append(update)
    assert sorted(by_adapter) == ["alpha", "beta"]
    for adapter, expected_windows in EXPECTED.items():
        lineage = by_adapter[adapter]
        assert [u.version for u in lineage] == list(range(1, len(expected_windows) + 1))
        assert [u.parent_version for u in lineage] == [None, *range(1, len(expected_windows))]
        assert [u.window.event_ids for u in lineage] == expected_windows
        trained = [i for u in lineage for i in u.window.event_ids]
        assert len(trained) == len(set(trained)), "an event was trained twice"
        for update in lineage:
            path = Path(urlparse(update.uri).path)
            digest = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
            assert digest == update.sha256
            assert update.format == "peft" and update.window.size == 16
            assert update.sha256 == reference[adapter, update.version], (
                f"{adapter} v{update.version} differs from the uninterrupted lineage"
            )
        # The windows repeat a few prompt → response pairs: a learnable task.
        losses = [u.train_loss for u in lineage]
        assert all(b < a for a, b in itertools.pairwise(losses)), losses
    return by_adapter


async def _committed(bootstrap: str, group: str, topic: str) -> int | None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(topic, 0))
    finally:
        await consumer.stop()


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


async def test_windows_of_16_become_versions_announced_exactly_once(
    kafka_bootstrap: str,
    prefix: str,
    home: Path,
    tmp_path: Path,
    reference: dict[tuple[str, int], str],
) -> None:
    topics = await _setup(kafka_bootstrap, prefix)
    adapters = tmp_path / "adapters"
    with Worker(
        ["train"], _env(kafka_bootstrap, prefix, home, adapters), tmp_path / "train.log"
    ) as worker:
        updates = await _updates(kafka_bootstrap, topics, 5)
        assert worker.alive(), worker.output()
        # The trainer commits offsets only up to the first event of alpha's partial window.
        stream = _stream()
        first_pending = next(i for i, e in enumerate(stream) if e.id == "alpha-048")
        await wait_for(
            lambda: _committed_is(kafka_bootstrap, prefix, topics, first_pending),
            30,
            "the trainer's committed offset",
        )
    assert len(updates) == 5, [(u.adapter, u.version) for u in updates]
    by_adapter = _check_lineages(updates, reference)

    # Every version loads with PEFT onto the base model, and each differs from its parent.
    from peft import PeftModel

    from trainer.model import default_tiny_model_dir, load_base_model

    base_dir = default_tiny_model_dir(home)
    for adapter, lineage in by_adapter.items():
        previous = None
        for update in lineage:
            path = Path(urlparse(update.uri).path)
            base = load_base_model(base_dir, torch.device("cpu"))
            model = PeftModel.from_pretrained(base.model, path)
            lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
            assert lora, f"{adapter} v{update.version} has no LoRA weights"
            tensors = load_file(path / "adapter_model.safetensors")
            if previous is not None:
                assert any(not torch.equal(tensors[k], previous[k]) for k in tensors), (
                    f"{adapter} v{update.version} has the same weights as v{update.version - 1}"
                )
            previous = tensors
    losses = {a: [round(u.train_loss, 4) for u in lineage] for a, lineage in by_adapter.items()}
    print(f"\ntrain_loss per version: {losses}")

    # What users see: the lineage and the stream of announcements, from the CLI.
    env = {**os.environ, **_env(kafka_bootstrap, prefix, home, adapters)}

    def cli(*args: str) -> str:
        done = subprocess.run(
            [LORASTREAM, *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    listed = [
        decode(line, AdapterUpdate) for line in cli("adapters", "list", "--json").splitlines()
    ]
    assert listed == sorted(updates, key=lambda u: (u.adapter, u.version))
    followed = cli("adapters", "follow", "--from-beginning", "-n", "5", "--timeout", "30", "--json")
    in_order = sorted(updates, key=lambda u: (u.adapter, u.version))
    assert (
        sorted(
            (decode(line, AdapterUpdate) for line in followed.splitlines()),
            key=lambda u: (u.adapter, u.version),
        )
        == in_order
    )
    table = cli("adapters", "list", "--adapter", "beta")
    assert "beta" in table and "alpha" not in table
    assert all(f"{u.train_loss:.4f}" in table for u in by_adapter["beta"])


async def _committed_is(bootstrap: str, prefix: str, topics: Topics, offset: int) -> bool:
    return (
        await _committed(bootstrap, f"{prefix}lorastream-trainer", topics.learning_events) == offset
    )


@pytest.mark.parametrize(
    ("fault", "adapter", "version"),
    [("step", "alpha", 2), ("commit", "beta", 1)],
    ids=["killed-mid-step", "killed-between-files-and-commit"],
)
async def test_sigkill_repeats_the_window_without_gap_or_repeat(
    kafka_bootstrap: str,
    prefix: str,
    home: Path,
    tmp_path: Path,
    fault: str,
    adapter: str,
    version: int,
    reference: dict[tuple[str, int], str],
) -> None:
    topics = await _setup(kafka_bootstrap, prefix)
    adapters = tmp_path / "adapters"
    env = _env(kafka_bootstrap, prefix, home, adapters)
    crashing = Worker(
        ["train"],
        {**env, "LORASTREAM_FAULTS": f"pause:{fault}:{adapter}:{version}"},
        tmp_path / "train-1.log",
    ).start()
    try:
        await wait_for(
            crashing.said("FAULT paused"),
            120,
            f"the trainer to reach {fault} of {adapter} v{version}",
        )
        if fault == "commit":
            assert (adapters / adapter / f"v{version}" / "adapter_model.safetensors").exists()
        before = await read_all(kafka_bootstrap, topics.adapter_updates, 0, settle=1)
        assert all((u.adapter, u.version) != (adapter, version) for u in map(_update, before)), (
            "the version was announced before its commit"
        )
    finally:
        crashing.kill()

    with Worker(["train"], env, tmp_path / "train-2.log") as worker:
        updates = await _updates(kafka_bootstrap, topics, 5)
        assert worker.alive(), worker.output()
    assert len(updates) == 5, [(u.adapter, u.version) for u in updates]
    _check_lineages(updates, reference)
    assert not list(adapters.glob("*/.*")), "temporary directories were left behind"


def _update(record: object) -> AdapterUpdate:
    return decode(record.value, AdapterUpdate)  # type: ignore[attr-defined]


async def test_a_window_with_a_nan_loss_is_quarantined_and_the_next_one_trains(
    kafka_bootstrap: str, prefix: str, home: Path, tmp_path: Path
) -> None:
    topics = await _setup(kafka_bootstrap, prefix)
    adapters = tmp_path / "adapters"
    env = _env(kafka_bootstrap, prefix, home, adapters, LORASTREAM_FAULTS="nan:alpha-020")
    with Worker(["train"], env, tmp_path / "train.log") as worker:
        records = await read_all(kafka_bootstrap, topics.adapter_updates, 4, timeout=180, settle=3)
        quarantined = await read_all(kafka_bootstrap, topics.quarantine, 1, timeout=30, settle=1)
        assert worker.alive(), worker.output()
    updates = [decode(r.value, AdapterUpdate) for r in records]
    alpha = [u for u in updates if u.adapter == "alpha"]
    assert [u.version for u in alpha] == [1, 2]
    assert [u.window.event_ids for u in alpha] == [EXPECTED["alpha"][0], EXPECTED["alpha"][2]]
    assert [u.version for u in updates if u.adapter == "beta"] == [1, 2]

    assert len(quarantined) == 1
    entry = orjson.loads(quarantined[0].value)
    assert quarantined[0].key == b"alpha"
    assert entry["adapter"] == "alpha" and entry["tries"] == 3
    assert entry["window"]["event_ids"] == EXPECTED["alpha"][1]
    assert [e["id"] for e in entry["events"]] == EXPECTED["alpha"][1]
    assert "NonFiniteLossError" in entry["error"], entry["error"]
    # The adapter stayed at its last good version: v2 continues from v1, not from the bad step.
    assert alpha[1].parent_version == 1
    assert not (adapters / "alpha" / "v3").exists()


async def test_restart_resumes_from_the_newest_announced_version(
    kafka_bootstrap: str, prefix: str, home: Path, tmp_path: Path
) -> None:
    topics = await _setup(kafka_bootstrap, prefix)
    adapters = tmp_path / "adapters"
    env = _env(kafka_bootstrap, prefix, home, adapters)
    with Worker(["train"], env, tmp_path / "train-1.log"):
        await _updates(kafka_bootstrap, topics, 5)
    more = [learning_event("alpha", n) for n in range(53, 64)]  # completes alpha's fourth window
    await produce(kafka_bootstrap, topics.learning_events, [(b"alpha", encode(e)) for e in more])
    with Worker(["train"], env, tmp_path / "train-2.log") as worker:
        updates = await _updates(kafka_bootstrap, topics, 6)
        assert worker.alive(), worker.output()
    alpha = [u for u in updates if u.adapter == "alpha"]
    assert [u.version for u in alpha] == [1, 2, 3, 4]
    assert alpha[3].window.event_ids == [f"alpha-{n:03d}" for n in range(48, 64)]

    # A corrupt file of the newest version holds that adapter with one line naming the file:
    # never a restart from 0, never a new version, and the trainer itself keeps running.
    newest = Path(urlparse(alpha[3].uri).path) / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-8] + b"corrupt!")
    late = [learning_event("alpha", n) for n in range(64, 80)]
    await produce(kafka_bootstrap, topics.learning_events, [(b"alpha", encode(e)) for e in late])
    with Worker(["train"], env, tmp_path / "train-3.log") as held:
        await wait_for(held.said("alpha is on hold"), 120, "the trainer to hold alpha")
        assert held.alive(), held.output()
        line = next(x for x in held.output().splitlines() if "alpha is on hold" in x)
        assert str(newest) in line and "sha256" in line
    assert len(await read_all(kafka_bootstrap, topics.adapter_updates, 6, settle=2)) == 6


@pytest.mark.parametrize("storage", ["local", "s3"])
async def test_two_trainers_share_the_partitions_and_each_window_trains_once(
    kafka_bootstrap: str,
    prefix: str,
    home: Path,
    tmp_path: Path,
    reference: dict[tuple[str, int], str],
    storage: str,
    request: pytest.FixtureRequest,
) -> None:
    """A second instance joins while windows are half full: the group rebalances, the
    partial windows move to their partition's new owner, and still every window trains
    exactly once, bit-identical to the uninterrupted lineage.

    With ``s3`` the adapters live in one bucket of a real S3Proxy and each trainer has
    its own local cache, as on two machines: the second resumes the adapters the first
    trained from the bucket alone."""
    from aiokafka.partitioner import DefaultPartitioner

    names = [f"team-{n}" for n in range(6)]
    partitions = {DefaultPartitioner()(n.encode(), [0, 1, 2], [0, 1, 2]) for n in names}
    # Every partition holds adapters, so whichever the second trainer gets, it has work.
    assert partitions == {0, 1, 2}, "choose adapter names that cover every partition"
    topics = await make_topics(kafka_bootstrap, prefix, partitions=3)
    events = {n: [learning_event(n, i) for i in range(32)] for n in names}

    async def send(part: slice) -> None:
        batch = [e for i in range(32)[part] for n in names for e in [events[n][i]]]
        await produce(
            kafka_bootstrap,
            topics.learning_events,
            [(e.adapter.encode(), encode(e)) for e in batch],
        )

    if storage == "s3":
        s3 = request.getfixturevalue("s3")
        where: str = f"{s3.bucket('trainers')}/{prefix.rstrip('.')}"
        env = {**_env(kafka_bootstrap, prefix, home, tmp_path), **s3.environment()}
        env["LORASTREAM_ADAPTER_DIR"] = where
        caches = {name: {"LORASTREAM_ADAPTER_CACHE": str(tmp_path / name)} for name in "ab"}
    else:
        where = str(tmp_path / "adapters")
        env = _env(kafka_bootstrap, prefix, home, Path(where))
        caches = {"a": {}, "b": {}}
    await send(slice(0, 20))  # every adapter: window 1 full, window 2 a quarter full
    first_env = {**env, "LORASTREAM_INSTANCE_ID": "a", **caches["a"]}
    with Worker(["train"], first_env, tmp_path / "a.log") as first:
        await _updates(kafka_bootstrap, topics, len(names), timeout=120)
        second_env = {**env, "LORASTREAM_INSTANCE_ID": "b", **caches["b"]}
        with Worker(["train"], second_env, tmp_path / "b.log") as second:

            async def joined() -> bool:
                return "resumed" in second.output()

            await wait_for(joined, 90, "the second trainer to get partitions")
            await send(slice(20, 32))
            updates = await _updates(kafka_bootstrap, topics, 2 * len(names), timeout=180)
            assert first.alive(), first.output()
            assert second.alive(), second.output()
    assert len(updates) == 2 * len(names), [(u.adapter, u.version) for u in updates]
    for name in names:
        lineage = [u for u in updates if u.adapter == name]
        assert [u.version for u in lineage] == [1, 2]
        assert [u.window.event_ids for u in lineage] == [
            [f"{name}-{n:03d}" for n in range(w * 16, w * 16 + 16)] for w in range(2)
        ]
        # Initial weights depend on the seed alone, and the windows repeat alpha's pairs.
        assert [u.sha256 for u in lineage] == [reference["alpha", 1], reference["alpha", 2]]
    trained_by_second = [line for line in second.output().splitlines() if " v2: " in line]
    assert trained_by_second, "the second trainer trained nothing; no rebalance was tested"
    assert all(u.uri == f"{where}/{u.adapter}/v{u.version}" or storage == "local" for u in updates)


async def test_events_waiting_in_an_open_window_are_shown_in_the_log_list_and_metrics(
    kafka_bootstrap: str, prefix: str, home: Path, tmp_path: Path
) -> None:
    """21 events with windows of 16: v1, and the other 5 are not invisible."""
    import urllib.request

    from lorastream.dev.ports import free_port

    topics = await make_topics(kafka_bootstrap, prefix)
    events = [learning_event("tutor", n) for n in range(21)]
    await produce(kafka_bootstrap, topics.learning_events, [(b"tutor", encode(e)) for e in events])
    port = free_port()
    env = _env(
        kafka_bootstrap,
        prefix,
        home,
        tmp_path / "adapters",
        LORASTREAM_METRICS_PORT=str(port),
        COLUMNS="250",  # the table is wrapped to 80 columns otherwise when piped
    )
    before = subprocess.run(
        [LORASTREAM, "adapters", "list"], env={**os.environ, **env}, capture_output=True, text=True
    )
    assert before.returncode == 0, before.stderr
    # No version yet: the window size is the lineage's to say, not this shell's (issue #22).
    waiting = "open window: 21 event(s) waiting (window size not known until v1)"
    assert waiting in " ".join(before.stdout.split())
    with Worker(["train"], env, tmp_path / "train.log") as trainer:
        await wait_for(
            trainer.said("waiting for full windows of 16: tutor 5/16"), 120, "the pending line"
        )
        assert "partial windows wait (LORASTREAM_MAX_WAIT_SECONDS" in trainer.output()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'lorastream_pending_events{adapter="tutor"} 5.0' in metrics
        listed = subprocess.run(
            [LORASTREAM, "adapters", "list"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        )
    assert listed.returncode == 0, listed.stderr
    text = " ".join(listed.stdout.split())
    assert "open window: 5 event(s) waiting for 16" in text
    assert len(await _updates(kafka_bootstrap, topics, 1)) == 1
