"""One truth for the views (issue #22): ``status``, ``adapters list`` and ``adapters follow``
say what the lineage and the trainer say, never what the viewer's own shell says; a name
that no adapter has is one line listing those that exist."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lorastream.dev.events import learning_event
from lorastream.dev.ports import free_port
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import LORASTREAM, Worker, worker_env
from lorastream.ops.status import group_lag
from schemas import AdapterUpdate, LoraSpec, QuarantineRecord, Topics, WindowSpec, encode
from tests.kafka_util import read_all, wait_for
from tests.lorastream.test_metrics_scrape import _scrape
from trainer.kafka import KafkaConnection

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ADAPTERS = "/nowhere/adapters"


def _cli(bootstrap: str, prefix: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A view, run from a shell whose own LORASTREAM_WINDOW_SIZE is not the trainer's."""
    return subprocess.run(
        [LORASTREAM, *args],
        env={
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "LORASTREAM_TOPIC_PREFIX": prefix,
            "LORASTREAM_ADAPTER_DIR": ADAPTERS,
            "LORASTREAM_WINDOW_SIZE": "16",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def _update(topic: str, adapter: str, version: int, first: int, size: int) -> AdapterUpdate:
    ids = [f"{adapter}-{n:03d}" for n in range(first, first + size)]
    return AdapterUpdate(
        adapter=adapter,
        version=version,
        parent_version=version - 1 or None,
        base_model="tiny",
        uri=f"{ADAPTERS}/{adapter}/v{version}",
        sha256="0" * 64,
        lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
        window=WindowSpec(
            topic=topic,
            partition=0,
            first_offset=first,
            last_offset=first + size - 1,
            size=size,
            event_ids=ids,
        ),
        train_loss=1.0,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


async def _lineage_in_windows_of_4(bootstrap: str, prefix: str) -> Topics:
    """alpha: v1, v2 in windows of 4 (offsets 0..7), 2 events waiting (8, 9); beta: 3 events
    and no version; gamma: one quarantined window and nothing else."""
    topics = await make_topics(bootstrap, prefix)
    events = [learning_event("alpha", n) for n in range(10)] + [
        learning_event("beta", n) for n in range(3)
    ]
    await produce(
        bootstrap, topics.learning_events, [(e.adapter.encode(), encode(e)) for e in events]
    )
    updates = [_update(topics.learning_events, "alpha", v, 4 * (v - 1), 4) for v in (1, 2)]
    await produce(bootstrap, topics.adapter_updates, [(b"alpha", encode(u)) for u in updates])
    gamma = learning_event("gamma", 0)
    quarantined = QuarantineRecord(
        adapter="gamma",
        error="step failed",
        tries=3,
        window=WindowSpec(
            topic=topics.learning_events,
            partition=1,
            first_offset=0,
            last_offset=0,
            size=1,
            event_ids=[gamma.id],
        ),
        events=[gamma],
    )
    await produce(bootstrap, topics.quarantine, [(b"gamma", encode(quarantined))])
    return topics


# ── finding 15: the window size is the lineage's ─────────────────────────────


async def test_status_and_adapters_list_say_the_lineages_window_not_the_viewers(
    kafka_bootstrap: str, prefix: str
) -> None:
    await _lineage_in_windows_of_4(kafka_bootstrap, prefix)

    done = _cli(kafka_bootstrap, prefix, "status", "--json")
    assert done.returncode == 0, done.stderr
    by_name = {a["adapter"]: a for a in json.loads(done.stdout)["adapters"]}
    assert by_name["alpha"]["pending_events"] == 2
    assert by_name["alpha"]["window_size"] == 4  # not the shell's 16
    assert by_name["beta"]["pending_events"] == 3
    assert by_name["beta"]["window_size"] is None  # no version: not known, not guessed

    table = _cli(kafka_bootstrap, prefix, "status")
    assert table.returncode == 0, table.stderr
    assert "2/4" in table.stdout and "3/?" in table.stdout, table.stdout
    assert "/16" not in table.stdout
    assert "the window size is not known until the adapter's first version" in table.stdout

    listed = _cli(kafka_bootstrap, prefix, "adapters", "list")
    assert listed.returncode == 0, listed.stderr
    flat = " ".join(listed.stdout.split())
    assert "2 event(s) waiting for 4" in flat, listed.stdout
    assert "waiting for 16" not in flat
    assert "3 event(s) waiting (window size not known until v1)" in flat, listed.stdout


# ── findings 11 and 12: a name that is wrong, or that no adapter has ─────────


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["adapters", "list", "--adapter", "a/b"],
            "AdapterNameError: --adapter 'a/b' is not an adapter name (1 to 64 letters, digits, "
            "'.', '_' or '-', the first a letter or digit)",
        ),
        (
            ["adapters", "list", "--adapter", "Alpha"],
            "AdapterNameError: --adapter Alpha: no adapter Alpha in {p}adapter-updates or "
            "{p}learning-events; the adapters that exist: alpha, beta, gamma",
        ),
        (
            ["adapters", "list", "--adapter", "bete", "--json"],
            "AdapterNameError: --adapter bete: no adapter bete in {p}adapter-updates or "
            "{p}learning-events; the adapters that exist: beta, ",
        ),
        (
            ["adapters", "fetch", "alpah"],
            "AdapterNameError: ADAPTER alpah: no adapter alpah in the versions announced on "
            "{p}adapter-updates; the adapters that exist: alpha",
        ),
        (
            ["adapters", "repair", "Alpha"],
            "AdapterNameError: ADAPTER Alpha: no adapter Alpha in the versions announced on "
            "{p}adapter-updates; the adapters that exist: alpha",
        ),
        (["adapters", "fetch", "../x"], "AdapterNameError: ADAPTER '../x' is not an adapter name"),
        (
            ["quarantine", "retry", "--adapter", "gama"],
            "InspectError: adapter gama has nothing in {p}learning-events.quarantine; the adapters it holds: gamma",
        ),
        (
            ["quarantine", "retry", "--adapter", "a b"],
            "AdapterNameError: --adapter 'a b' is not an adapter name",
        ),
        (
            ["replay", "--adapter", "Alpha", "--into", "x"],
            "ReplayError: unknown adapter Alpha: {p}learning-events holds no events of it; "
            "the adapters that exist: alpha, beta",
        ),
    ],
    ids=[
        "list-invalid",
        "list-unknown",
        "list-unknown-json",
        "fetch-unknown",
        "repair-unknown",
        "fetch-invalid",
        "retry-unknown",
        "retry-invalid",
        "replay-unknown",
    ],
)
async def test_a_name_no_adapter_has_is_one_line_listing_those_that_exist(
    kafka_bootstrap: str, prefix: str, tmp_path: Path, args: list[str], expected: str
) -> None:
    await _lineage_in_windows_of_4(kafka_bootstrap, prefix)
    done = _cli(kafka_bootstrap, prefix, *args, LORASTREAM_HOME=str(tmp_path))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(expected.format(p=prefix)), lines[0]
    assert done.stdout == ""


# ── finding 17: follow -n stops at n ─────────────────────────────────────────


async def test_follow_from_the_beginning_stops_at_n(kafka_bootstrap: str, prefix: str) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    updates = [_update(topics.learning_events, "alpha", v, 4 * (v - 1), 4) for v in range(1, 7)]
    await produce(kafka_bootstrap, topics.adapter_updates, [(b"alpha", encode(u)) for u in updates])
    done = _cli(
        kafka_bootstrap, prefix, "adapters", "follow", "--from-beginning", "-n", "2", "--json"
    )
    assert done.returncode == 0, done.stderr
    versions = [json.loads(line)["version"] for line in done.stdout.splitlines()]
    assert versions == [1, 2]


# ── finding 16: one lag, in status and in the trainer's gauge ───────────────


async def test_the_trainers_lag_gauge_and_status_count_one_lag(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    """A real trainer in windows of 4 trains 8 of tutor's 10 events: 2 wait in its open
    window, so its group's committed offset stays at 8 of 10. The gauge, `status` and
    `adapters list` all say 2 (the gauge said 0: it counted from the fetch position)."""
    topics = await make_topics(kafka_bootstrap, prefix)
    events = [learning_event("tutor", n) for n in range(10)]
    await produce(kafka_bootstrap, topics.learning_events, [(b"tutor", encode(e)) for e in events])
    port = free_port()
    env = worker_env(
        kafka_bootstrap,
        prefix,
        tmp_path / "home",
        LORASTREAM_ADAPTER_DIR=str(tmp_path / "adapters"),
        LORASTREAM_WINDOW_SIZE="4",
    )
    gauge = ("lorastream_consumer_lag", (("partition", "0"), ("topic", topics.learning_events)))
    with Worker(["train", "--metrics-port", str(port)], env, tmp_path / "train.log") as trainer:
        await read_all(kafka_bootstrap, topics.adapter_updates, 2, timeout=120)
        kafka = KafkaConnection(kafka_bootstrap)

        async def settled() -> bool:
            lag = await group_lag(kafka, f"{prefix}lorastream-trainer", topics.learning_events)
            return lag.partitions.get(0) == 2 and _scrape(port).get(gauge) == 2

        await wait_for(settled, 60, "the trainer's commit of offset 8, in status and the gauge")
        view = {**env, "LORASTREAM_WINDOW_SIZE": "16"}
        status = subprocess.run(
            [LORASTREAM, "status", "--json"],
            env={**os.environ, **view},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert shown["lag"]["trainer"]["partitions"] == {"0": 2}
        assert shown["lag"]["trainer"]["total"] == sum(
            v for (name, _), v in _scrape(port).items() if name == "lorastream_consumer_lag"
        )
        assert shown["adapters"][0]["pending_events"] == 2
        assert shown["adapters"][0]["window_size"] == 4
        listed = subprocess.run(
            [LORASTREAM, "adapters", "list"],
            env={**os.environ, **view},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert f"trainer lag: 2 on {topics.learning_events}" in listed.stdout, listed.stdout
        assert trainer.alive(), trainer.output()
