"""Looking at what the pipeline refused, on the real broker, through the real command:
dead letters (list, export, produce back), quarantine records (list, retry, and the
trainer training a retried window), and the topics' list and delete."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from lorastream.dev.events import learning_event
from lorastream.dev.ports import free_port
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import LORASTREAM, Worker, worker_env
from lorastream.ops.admin import list_topics
from lorastream.ops.inspect import QuarantineEntry
from lorastream.ops.retry import refusal
from schemas import (
    AdapterUpdate,
    DeadLetter,
    GenerationResult,
    KafkaPosition,
    QuarantineRecord,
    SourcePosition,
    Topics,
    WindowSpec,
    decode,
    encode,
)
from streams.routing import SourceRecord, route
from streams.scoring import Thresholds
from tests.kafka_util import read_all, wait_for
from trainer.kafka import KafkaConnection

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _run(bootstrap: str, prefix: str, *args: str, **more: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "LORASTREAM_TOPIC_PREFIX": prefix,
        **more,
    }
    return subprocess.run([LORASTREAM, *args], env=env, capture_output=True, text=True, timeout=120)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


NAN_LINE = b'{"id":"r0","adapter":"tutor","prompt":"2+2=","response":"4","entropy_delta":NaN}'
MISSPELT = orjson.dumps(
    {
        "id": "r1",
        "adapter": "tutor",
        "prompt": "p",
        "response": "r",
        "baselin": "r",
        "entropy_delta": 0.4,
    }
)
NOT_UTF8 = b"\xff\xfe{}"
TWO_LINES = b'{"id": "r3",\n "adapter": "tutor"}'


async def _dead_letters(bootstrap: str, topics: Topics) -> None:
    """What the scorer writes for four bad inputs (its own routing code), and one record
    on the dead-letter topic that is not a dead letter at all."""
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
    for offset, raw in enumerate([NAN_LINE, MISSPELT, NOT_UTF8, TWO_LINES]):
        source = SourceRecord(
            b"tutor", raw, KafkaPosition(topics.generation_results, 0, 40 + offset), 1_700_000
        )
        letter = route(source, Thresholds()).output
        assert isinstance(letter, DeadLetter)
        records.append((letter.key, letter.value, letter.headers))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(topics.dead_letters, value, key=key, headers=headers)
        await producer.send_and_wait(
            topics.dead_letters, b"stranger", headers=[("lorastream.error", b"\xff")]
        )
    finally:
        await producer.stop()


async def test_dead_letters_list_shows_each_position_reason_fields_source_and_value(
    kafka_bootstrap: str, prefix: str
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    await _dead_letters(kafka_bootstrap, topics)
    dlq = topics.dead_letters

    shown = _run(kafka_bootstrap, prefix, "dead-letters", "list")
    assert shown.returncode == 0, shown.stderr
    blocks = shown.stdout.split(f"\n{dlq}[0]@")
    assert len(blocks) == 5, shown.stdout
    first = blocks[0]
    assert first.startswith(f"{dlq}[0]@0  from {topics.generation_results}[0]@40  key tutor")
    assert "NaN is not allowed in JSON" in first and "fields  $" in first
    assert '"entropy_delta":NaN}' in first
    assert blocks[1].startswith(f"1  from {topics.generation_results}[0]@41")
    assert "baselin: is not a field" in blocks[1] and "fields  baselin" in blocks[1]
    assert "not UTF-8" in blocks[2]
    assert blocks[4].startswith("4  key -") and "headers unreadable: " in blocks[4]
    assert "lorastream.error: is not UTF-8" in blocks[4]
    assert shown.stderr.strip() == f"5 dead letters in {dlq}"

    as_json = _run(kafka_bootstrap, prefix, "dead-letters", "list", "--json")
    assert as_json.returncode == 0, as_json.stderr
    docs = [orjson.loads(line) for line in as_json.stdout.splitlines()]
    assert [d["position"] for d in docs] == [
        {"topic": dlq, "partition": 0, "offset": n} for n in range(5)
    ]
    assert docs[1]["fields"] == ["baselin"] and "baselin" in docs[1]["reason"]
    assert docs[1]["source"]["offset"] == 41 and docs[1]["source"]["timestamp"] == 1_700_000
    assert (docs[1]["key"], docs[1]["value"].encode()) == ("tutor", MISSPELT)
    assert docs[2]["value_encoding"] == "base64"
    assert base64.b64decode(docs[2]["value"]) == NOT_UTF8
    assert docs[4]["reason"] is None and docs[4]["headers_unreadable"]
    assert not any(d["truncated"] for d in docs)

    limited = _run(kafka_bootstrap, prefix, "dead-letters", "list", "--json", "--limit", "2")
    assert len(limited.stdout.splitlines()) == 2
    assert "more remain" in limited.stderr


async def test_exported_dead_letters_fixed_and_produced_reach_generation_results(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    await _dead_letters(kafka_bootstrap, topics)
    dlq, file = topics.dead_letters, tmp_path / "fix.jsonl"

    exported = _run(kafka_bootstrap, prefix, "dead-letters", "export", str(file))
    assert exported.returncode == 0, exported.stderr
    assert file.read_bytes() == NAN_LINE + b"\n" + MISSPELT + b"\n"
    assert f"{file}:1: from {dlq}[0]@0: " in exported.stdout
    assert f"lorastream produce {file}" in exported.stdout
    assert "skipped 3" in exported.stderr
    for offset, why in [
        (2, "value is not UTF-8"),
        (3, "value spans several lines"),
        (4, "headers are unreadable"),
    ]:
        assert f"{dlq}[0]@{offset}: its {why}" in exported.stderr, exported.stderr
    again = _run(kafka_bootstrap, prefix, "dead-letters", "export", str(file))
    assert "exists" in _one_error_line(again)

    unfixed = _run(kafka_bootstrap, prefix, "produce", "--strict", str(file))
    assert unfixed.returncode == 1
    assert f"{file}:1: invalid GenerationResult: $: not valid JSON: NaN is not allowed" in (
        unfixed.stderr
    )
    assert "line 1 column 77" in unfixed.stderr

    fixed = file.read_text().replace("NaN", "-0.4").replace('"baselin"', '"baseline"')
    file.write_text(fixed)
    produced = _run(kafka_bootstrap, prefix, "produce", str(file))
    assert produced.returncode == 0, produced.stderr
    records = await read_all(kafka_bootstrap, topics.generation_results, 2, settle=0.5)
    results = [decode(r.value, GenerationResult) for r in records]
    assert [(r.id, r.entropy_delta, r.baseline) for r in results] == [
        ("r0", -0.4, None),
        ("r1", 0.4, "r"),
    ]


def _window(topics: Topics, adapter: str, first: int, count: int) -> QuarantineRecord:
    """A quarantined window as the trainer's core builds it (trainer.core.WindowTrainer.train)."""
    events = [learning_event(adapter, n) for n in range(count)]
    spec = WindowSpec(
        topic=topics.learning_events,
        partition=0,
        first_offset=first,
        last_offset=first + count - 1,
        size=count,
        event_ids=[e.id for e in events],
    )
    return QuarantineRecord(
        adapter=adapter, error="try 1: NonFiniteLossError: nan", tries=3, window=spec, events=events
    )


async def test_retry_refuses_truncated_lone_and_unreadable_records_in_one_line(
    kafka_bootstrap: str, prefix: str
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    whole = _window(topics, "cut", 0, 4)
    lone = QuarantineRecord.bad_record(
        "cut",
        "invalid LearningEvent: $: not valid JSON",
        SourcePosition(topic=topics.learning_events, partition=0, offset=4),
        b"{broken",
    )
    # The bounded form is what the trainer writes when the whole record is too big.
    await produce(
        kafka_bootstrap,
        topics.quarantine,
        [(b"cut", encode(whole.bounded())), (b"cut", encode(lone)), (None, b"garbage")],
    )
    q = topics.quarantine

    listed = _run(kafka_bootstrap, prefix, "quarantine", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].startswith(
        f"{q}[0]@0  adapter cut  window {topics.learning_events}[0]@0..3  4 events (truncated"
    )
    assert lines[0].endswith("tries 3") and lines[1] == "  error  try 1: NonFiniteLossError: nan"
    assert f"unreadable event {topics.learning_events}[0]@4" in lines[2]
    assert lines[4].startswith(f"{q}[0]@2  not a quarantine record: $: not valid JSON")
    as_json = _run(kafka_bootstrap, prefix, "quarantine", "list", "--json")
    docs = [orjson.loads(line) for line in as_json.stdout.splitlines()]
    assert [(d["kind"], d["truncated"], d["events"]) for d in docs] == [
        ("window", True, 0),
        ("event", False, 0),
        ("unreadable", False, 0),
    ]
    assert whole.window is not None
    assert docs[0]["window"]["event_ids"] == whole.window.event_ids
    assert docs[1]["source"]["offset"] == 4 and docs[1]["value_bytes"] == len(b"{broken")

    truncated = _one_error_line(
        _run(kafka_bootstrap, prefix, "quarantine", "retry", "--partition", "0", "--offset", "0")
    )
    assert truncated.startswith(f"RetryRefused: {q}[0]@0 is truncated")
    assert f"lie at {topics.learning_events}[0]@0..3" in truncated
    alone = _one_error_line(
        _run(kafka_bootstrap, prefix, "quarantine", "retry", "--partition", "0", "--offset", "1")
    )
    assert "not a window of events but one unreadable learning event" in alone
    garbage = _one_error_line(
        _run(kafka_bootstrap, prefix, "quarantine", "retry", "--partition", "0", "--offset", "2")
    )
    assert "not a quarantine record" in garbage
    everything = _one_error_line(
        _run(kafka_bootstrap, prefix, "quarantine", "retry", "--adapter", "cut")
    )
    assert "none of the 2 quarantine record(s) of adapter cut can be retried" in everything
    assert await read_all(kafka_bootstrap, topics.learning_events, 0, settle=0.5) == []

    missing = _one_error_line(_run(kafka_bootstrap, f"no{prefix}", "dead-letters", "list"))
    assert missing.startswith(f"InspectError: topic no{prefix}generation-results.dlq does not")
    closed = f"127.0.0.1:{free_port()}"  # a port where nothing listens
    down = _one_error_line(_run(closed, prefix, "quarantine", "list"))
    assert down.startswith("KafkaUnavailableError: reading ") and closed in down


async def test_a_retried_window_is_trained_and_a_second_retry_is_refused(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    events = [learning_event("poison", n) for n in range(16)]
    await produce(kafka_bootstrap, topics.learning_events, [(b"poison", encode(e)) for e in events])
    ids = [e.id for e in events]
    env = worker_env(
        kafka_bootstrap, prefix, tmp_path / "home", LORASTREAM_ADAPTER_DIR=str(tmp_path / "a")
    )
    q = topics.quarantine

    def retry(offset: int) -> subprocess.CompletedProcess[str]:
        return _run(
            kafka_bootstrap,
            prefix,
            "quarantine",
            "retry",
            "--partition",
            "0",
            "--offset",
            str(offset),
            LORASTREAM_ADAPTER_DIR=env["LORASTREAM_ADAPTER_DIR"],
        )

    poisoned = {**env, "LORASTREAM_FAULTS": "nan:poison-003"}
    with Worker(["train"], poisoned, tmp_path / "t1.log") as trainer:
        await read_all(kafka_bootstrap, q, 1, timeout=120, settle=0)
        first = retry(0)
        assert first.returncode == 0, first.stderr
        assert first.stdout.startswith(
            f"re-published {q}[0]@0: 16 events of poison (poison-000 … poison-015) "
            f"to {topics.learning_events}[0]@16..31"
        ), first.stdout
        # Still poisoned: the retried window is quarantined again.
        again = await read_all(kafka_bootstrap, q, 2, timeout=60, settle=0)
        assert trainer.alive(), trainer.output()
    (requarantined,) = again[1:]  # its offset is past the first transaction's marker
    second = decode(requarantined.value, QuarantineRecord)
    assert second.window is not None and second.window.event_ids == ids
    assert (second.window.first_offset, second.window.last_offset) == (16, 31)
    stale = _one_error_line(retry(0))
    assert f"quarantined again at {q}[0]@{requarantined.offset} " in stale
    assert stale.endswith("retry that one instead")

    last = retry(requarantined.offset)
    assert last.returncode == 0, last.stderr
    where = last.stdout.split(" to ", 1)[1].split()[0]  # after the first retry and its marker
    assert where == f"{topics.learning_events}[0]@33..48", last.stdout
    with Worker(["train"], env, tmp_path / "t2.log") as trainer:
        (record,) = await read_all(kafka_bootstrap, topics.adapter_updates, 1, timeout=120)
        assert trainer.alive(), trainer.output()
    update = decode(record.value, AdapterUpdate)
    assert (update.adapter, update.version, update.window.event_ids) == ("poison", 1, ids)
    assert (update.window.first_offset, update.window.last_offset) == (33, 48)
    done = _one_error_line(retry(requarantined.offset))
    assert "all 16 of its events are trained, in poison v1" in done


async def test_topics_list_shows_the_pipeline_and_delete_needs_yes(
    kafka_bootstrap: str, prefix: str
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix, partitions=2)
    await produce(kafka_bootstrap, topics.generation_results, [(b"a", b"{}")] * 3)

    listed = _run(kafka_bootstrap, prefix, "topics", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1:] for line in listed.stdout.splitlines()[1:]}
    assert list(rows) == topics.all()
    assert rows[topics.generation_results] == ["2", "3"]
    assert rows[topics.adapter_updates] == ["2", "0"]
    everything = _run(kafka_bootstrap, prefix, "topics", "list", "--all")
    assert set(topics.all()) <= {line.split()[0] for line in everything.stdout.splitlines()}

    empty = _one_error_line(_run(kafka_bootstrap, prefix, "topics", "delete", "--prefix", ""))
    assert "--prefix is empty" in empty
    unconfirmed = _run(kafka_bootstrap, prefix, "topics", "delete", "--prefix", prefix)
    assert unconfirmed.returncode == 1
    n = len(topics.all())
    assert f"{n} topic(s) would be deleted; add --yes to delete them" in unconfirmed.stderr
    assert {line.split()[0] for line in unconfirmed.stdout.splitlines()[1:]} == set(topics.all())
    assert len(await list_topics(KafkaConnection(kafka_bootstrap), prefix)) == n

    deleted = _run(kafka_bootstrap, prefix, "topics", "delete", "--prefix", prefix, "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert f"deleted {n} topic(s) starting with '{prefix}'" in deleted.stdout

    async def gone() -> bool:
        return await list_topics(KafkaConnection(kafka_bootstrap), prefix) == []

    await wait_for(gone, 30, "the deleted topics to disappear")
    after = _run(kafka_bootstrap, prefix, "topics", "list").stdout.splitlines()
    assert [line.split()[1:] for line in after[1 : n + 1]] == [["missing", "-"]] * n
    assert after[n + 1] == "(run `lorastream topics create` for the missing ones)"


def test_retry_rules_without_a_broker() -> None:
    """Which quarantined windows `quarantine retry` takes, decided on records alone."""
    topics = Topics.named("x.")
    record = _window(topics, "a", 0, 4)
    ids = record.window.event_ids if record.window else []
    first = QuarantineEntry(KafkaPosition(topics.quarantine, 0, 5), b"a", record)
    assert refusal(first, {}, [first]) is None
    assert refusal(first, {ids[0]: 1}, [first]) is None  # some trained: the trainer skips those
    trained = refusal(first, dict.fromkeys(ids, 2), [first])
    assert trained is not None and "all 4 of its events are trained, in a v2" in trained
    later = QuarantineEntry(KafkaPosition(topics.quarantine, 0, 9), b"a", record)
    again = refusal(first, {}, [first, later])
    assert again is not None and f"quarantined again at {topics.quarantine}[0]@9" in again
    assert refusal(later, {}, [first, later]) is None  # the earlier one is not a retry of it
    other = _window(topics, "b", 0, 4)
    unrelated = QuarantineEntry(KafkaPosition(topics.quarantine, 0, 9), b"b", other)
    assert refusal(first, {}, [first, unrelated]) is None
