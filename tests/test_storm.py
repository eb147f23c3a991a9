"""A storm of hostile records into both doors, with the scorer and the trainer running as
real processes: every input offset is accounted for (scored, dead-lettered, trained,
quarantined, skipped as a duplicate or waiting in an open window), nothing else; good
records still flow afterwards; the scorer's memory stays bounded."""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from lorastream.dev.hostile import (
    Accounting,
    Hostile,
    account_learning_events,
    account_results,
    dead_letter_sources,
    hostile_records,
    positions,
)
from lorastream.dev.topics import make_topics
from lorastream.dev.workers import Worker, worker_env
from schemas import AdapterUpdate, LearningEvent, QuarantineRecord, decode
from tests.kafka_util import read_all, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

STORM = int(os.environ.get("LORASTREAM_STORM", "10000"))


async def _produce(bootstrap: str, topic: str, records: list[Hostile]) -> tuple[int, int]:
    """Produce what the broker takes; return (taken, refused at the door as too large)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    taken = refused = 0
    try:
        futures = []
        for record in records:
            try:
                futures.append(
                    await producer.send(
                        topic, key=record.key, value=record.value, headers=record.headers
                    )
                )
            except MessageSizeTooLargeError:
                refused += 1
        for future in futures:
            await future
            taken += 1
    finally:
        await producer.stop()
    return taken, refused


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _report(name: str, acc: Accounting) -> str:
    outcomes = ", ".join(f"{k} {v}" for k, v in acc.outcomes.most_common())
    reasons = ", ".join(f"{k} {v}" for k, v in acc.reasons.most_common(8))
    return f"{name}: {outcomes}; refused fields: {reasons}"


@pytest.mark.timed  # asserts on wall time or memory
async def test_a_storm_of_hostile_records_loses_nothing_and_stops_nothing(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix, partitions=1)
    results = hostile_records("generation-results", STORM, seed=1)
    events = hostile_records("learning-events", STORM, seed=2)
    past_limit = [Hostile(b"alpha", b'{"id": "' + b"x" * 1_200_000 + b'"}', [], "past-limit")]
    r_taken, r_refused = await _produce(
        kafka_bootstrap, topics.generation_results, results + past_limit
    )
    e_taken, e_refused = await _produce(
        kafka_bootstrap, topics.learning_events, events + past_limit
    )
    assert (r_refused, e_refused) == (1, 1)

    env = worker_env(
        kafka_bootstrap, prefix, tmp_path / "home", LORASTREAM_ADAPTER_DIR=str(tmp_path / "ad")
    )
    started = time.monotonic()
    with (
        Worker(["score"], env, tmp_path / "score.log") as scorer,
        Worker(["train"], env, tmp_path / "train.log") as trainer,
    ):
        state: dict[str, Accounting] = {}

        async def settled() -> bool:
            inputs = await read_all(kafka_bootstrap, topics.generation_results, r_taken, settle=0)
            out = await read_all(kafka_bootstrap, topics.learning_events, e_taken, settle=0.5)
            dead = await read_all(kafka_bootstrap, topics.dead_letters, 0, settle=0.5)
            sources = [decode(r.value, LearningEvent).source for r in out[e_taken:]]
            scored = {(s.partition, s.offset) for s in sources}
            state["results"] = account_results(positions(inputs), scored, dead_letter_sources(dead))
            updates = await read_all(kafka_bootstrap, topics.adapter_updates, 0, settle=0.5)
            quarantined = await read_all(kafka_bootstrap, topics.quarantine, 0, settle=0.5)
            state["events"] = account_learning_events(
                positions(out),
                [decode(r.value, AdapterUpdate) for r in updates],
                [decode(r.value, QuarantineRecord) for r in quarantined],
                16,
            )
            return not state["results"].lost and not state["events"].lost

        await wait_for(settled, 600, "every hostile record to be accounted for", interval=5)
        seconds = time.monotonic() - started
        assert scorer.alive(), scorer.output()[-3000:]
        assert trainer.alive(), trainer.output()[-3000:]
        for name in ("results", "events"):
            assert state[name].conflicting == [], (name, state[name].conflicting[:20])

        # After the storm, good records still flow all the way to a version.
        calm = [
            (
                b"calm",
                orjson.dumps(
                    {
                        "id": f"calm-{n}",
                        "adapter": "calm",
                        "prompt": "p",
                        "response": "r",
                        "entropy_delta": -0.5,
                    }
                ),
            )
            for n in range(16)
        ]
        await _produce(
            kafka_bootstrap,
            topics.generation_results,
            [Hostile(k, v, [], "valid") for k, v in calm],
        )

        async def calm_trained() -> bool:
            records = await read_all(kafka_bootstrap, topics.adapter_updates, 0, settle=0.5)
            return any(decode(r.value, AdapterUpdate).adapter == "calm" for r in records)

        await wait_for(calm_trained, 240, "calm v1 after the storm", interval=2)
        peak = _peak_rss_mb(scorer.proc.pid)  # type: ignore[union-attr]
    print(
        f"\nstorm: {r_taken} results and {e_taken} learning events taken by the broker "
        f"({r_refused} + {e_refused} refused as too large), settled in {seconds:.0f}s; "
        f"scorer peak RSS {peak:.0f} MB\n"
        f"{_report('generation-results', state['results'])}\n"
        f"{_report('learning-events', state['events'])}"
    )
    assert peak < 400, f"the scorer's peak RSS was {peak:.0f} MB"
