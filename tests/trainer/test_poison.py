"""Nothing in one record or one window stops the trainer: big, broken and badly keyed input,
and a disk that fills up, on the real broker with the trainer as a real process."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from lorastream.dev.events import learning_event
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import Worker, worker_env
from schemas import AdapterUpdate, QuarantineRecord, decode, encode
from schemas.limits import KEPT_PAYLOAD_BYTES, MAX_OUTPUT_BYTES
from tests.kafka_util import read_all, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _env(bootstrap: str, prefix: str, tmp: Path, **more: str) -> dict[str, str]:
    return worker_env(
        bootstrap,
        prefix,
        tmp / "home",
        LORASTREAM_ADAPTER_DIR=str(tmp / "adapters"),
        LORASTREAM_EVAL_FRACTION="0",  # the windows checked are every event's
        **more,
    )


def _big(adapter: str, n: int, size: int) -> bytes:
    event = learning_event(adapter, n).model_copy(update={"prompt": "p" * size})
    return encode(event)


async def test_a_huge_unreadable_record_is_quarantined_bounded_and_the_partition_goes_on(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    huge = orjson.dumps({"id": "big", "adapter": "after", "prompt": "x" * 800_000})
    valid = [(b"after", encode(learning_event("after", n))) for n in range(16)]
    await produce(kafka_bootstrap, topics.learning_events, [(b"after", huge), *valid])
    with Worker(["train"], _env(kafka_bootstrap, prefix, tmp_path), tmp_path / "t.log") as worker:
        updates = await read_all(kafka_bootstrap, topics.adapter_updates, 1, timeout=120)
        quarantined = await read_all(kafka_bootstrap, topics.quarantine, 1, settle=1)
        assert worker.alive(), worker.output()
    assert [decode(r.value, AdapterUpdate).version for r in updates] == [1]
    (record,) = quarantined
    assert len(record.value) + len(record.key or b"") < MAX_OUTPUT_BYTES
    entry = decode(record.value, QuarantineRecord)
    assert entry.truncated and entry.adapter == "after"
    assert entry.source is not None and entry.source.offset == 0
    assert entry.original_size == len(huge)
    assert entry.original_sha256 == hashlib.sha256(huge).hexdigest()
    assert base64.b64decode(entry.value_base64 or "") == huge[:KEPT_PAYLOAD_BYTES]


async def test_a_window_too_big_to_quarantine_whole_is_quarantined_without_its_events(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    events = [(b"w", _big("w", n, 80_000)) for n in range(16)]  # 1.3 MB as one record
    events += [(b"w", encode(learning_event("w", n))) for n in range(16, 32)]
    await produce(kafka_bootstrap, topics.learning_events, events)
    env = _env(kafka_bootstrap, prefix, tmp_path, LORASTREAM_FAULTS="nan:w-003")
    with Worker(["train"], env, tmp_path / "t.log") as worker:
        updates = await read_all(kafka_bootstrap, topics.adapter_updates, 1, timeout=120)
        quarantined = await read_all(kafka_bootstrap, topics.quarantine, 1, settle=1)
        assert worker.alive(), worker.output()
    (update,) = [decode(r.value, AdapterUpdate) for r in updates]
    assert update.version == 1 and update.window.first_offset == 16
    (record,) = quarantined
    assert len(record.value) < MAX_OUTPUT_BYTES
    entry = decode(record.value, QuarantineRecord)
    assert entry.truncated and entry.events == [] and entry.tries == 3
    assert entry.window is not None
    assert entry.window.event_ids == [f"w-{n:03d}" for n in range(16)]
    assert (entry.window.first_offset, entry.window.last_offset) == (0, 15)
    assert entry.original_size is not None and entry.original_size > MAX_OUTPUT_BYTES


async def _transactions(bootstrap: str, topic: str, records: int) -> int:
    """Commit markers take one offset each: the end offset less the records counts them."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        return int((await consumer.end_offsets([tp]))[tp]) - records
    finally:
        await consumer.stop()


async def test_badly_keyed_records_never_become_adapters_and_are_quarantined_in_batches(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    keys: list[bytes | None] = [b"../../etc", b".", b"..", None, b"\xff\xfe", b"ok"]
    bad = [(keys[i % len(keys)], b"{broken %d" % i) for i in range(300)]
    good = [(b"ok", encode(learning_event("ok", n))) for n in range(16)]
    await produce(kafka_bootstrap, topics.learning_events, [*bad, *good])
    env = _env(kafka_bootstrap, prefix, tmp_path)
    with Worker(["train"], env, tmp_path / "t1.log") as worker:
        await read_all(kafka_bootstrap, topics.adapter_updates, 1, timeout=120)
        quarantined = await read_all(kafka_bootstrap, topics.quarantine, 300, settle=1)
        assert worker.alive(), worker.output()
    assert len(quarantined) == 300
    entries = [decode(r.value, QuarantineRecord) for r in quarantined]
    assert [e.source.offset for e in entries if e.source] == list(range(300))
    assert {e.adapter for e in entries} == {None, "ok"}
    assert {r.key for r in quarantined} == {None, b"ok"}
    assert await _transactions(kafka_bootstrap, topics.quarantine, 300) <= 4

    with Worker(["train"], env, tmp_path / "t2.log") as again:
        await wait_for(again.said("resumed:"), 90, "the restarted trainer's resume")
    resumed = next(line for line in again.output().splitlines() if "resumed:" in line)
    assert resumed.split("resumed:")[1].split() == ["ok", "v1"], resumed


async def test_a_full_disk_is_waited_out_with_one_line_and_training_resumes(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    await produce(
        kafka_bootstrap,
        topics.learning_events,
        [(b"disk", encode(learning_event("disk", n))) for n in range(16)],
    )
    full = tmp_path / "disk-is-full"
    full.touch()
    env = _env(kafka_bootstrap, prefix, tmp_path, LORASTREAM_FAULTS=f"full:{full}")
    with Worker(["train"], env, tmp_path / "t.log") as worker:
        await wait_for(worker.said("trying again in 2s"), 120, "a second try on a full disk")
        assert await read_all(kafka_bootstrap, topics.adapter_updates, 0, settle=1) == []
        lines = [line for line in worker.output().splitlines() if "No space left" in line]
        assert "cannot write adapter disk v1 under" in lines[0]
        assert "(ENOSPC); trying again in 1s" in lines[0]
        full.unlink()  # space is back
        updates = await read_all(kafka_bootstrap, topics.adapter_updates, 1, timeout=120)
        assert worker.alive(), worker.output()
    assert [decode(r.value, AdapterUpdate).version for r in updates] == [1]
    assert "Traceback" not in worker.output()


def test_a_real_write_refusal_from_safetensors_is_named_as_a_resource_error(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The store recognises the OS's refusal through safetensors' Rust writer: here a file
    size limit (EFBIG), the same path as ENOSPC on a full disk."""
    script = (
        "import resource, sys, torch; from pathlib import Path;"
        "from trainer.exceptions import ResourceError;"
        "from trainer.config import LoraSettings; from trainer.lora import LoraStepper;"
        "from trainer.model import load_base_model;"
        "from trainer.store import AdapterStore;"
        "base = load_base_model(Path(sys.argv[1]), torch.device('cpu'));"
        "stepper = LoraStepper(base, LoraSettings(), seed=0);"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY));"
        "store = AdapterStore(Path(sys.argv[2]))\n"
        "try:\n"
        "    store.write('tutor', 1, stepper.initial_state(), stepper, {})\n"
        "except ResourceError as exc:\n"
        "    print('ResourceError', exc.errno, exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tiny_model_dir), str(tmp_path / "adapters")],
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ResourceError 27 cannot write adapter tutor v1 under"), (
        done.stdout
    )
    assert "File too large (EFBIG)" in done.stdout
    assert not list((tmp_path / "adapters" / "tutor").glob(".*")), "staging left behind"
