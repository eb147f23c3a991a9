"""End-to-end throughput of the scoring worker on the real broker.

Produces N GenerationResults (every one qualifies, half with a baseline to
score), starts ``lorastream score`` as a process, and times until the N-th
LearningEvent is readable. Uses KAFKA_BOOTSTRAP_SERVERS if set, else starts
the local broker on free ports for the run.

    .venv/bin/python bench/bench_scoring.py [--results 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.broker import bench_bootstrap
from tests.kafka_util import Worker, make_topics, produce, worker_env

WORDS = [
    "the",
    "model",
    "answered",
    "the",
    "question",
    "about",
    "rivers",
    "mountains",
    "and",
    "cities",
    "with",
    "care",
]


def _results(n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(40)]
        doc = {
            "id": f"b{i}",
            "adapter": f"a{i % 4}",
            "prompt": f"q{i}",
            "response": " ".join(words),
            "entropy_delta": -0.3,
        }
        if i % 2 == 0:
            doc["baseline"] = " ".join(reversed(words))
        out.append((f"a{i % 4}".encode(), orjson.dumps(doc)))
    return out


async def _wait_for(bootstrap: str, topic: str, n: int, partitions: int) -> tuple[float, float]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    seen, first = 0, None
    try:
        while seen < n:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                if records and first is None:
                    first = time.perf_counter()
                seen += len(records)
        return first or time.perf_counter(), time.perf_counter()
    finally:
        await consumer.stop()


async def main(n: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    with bench_bootstrap(tmp) as bootstrap:
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        topics = await make_topics(bootstrap, prefix, partitions=3)
        t0 = time.perf_counter()
        await produce(bootstrap, topics.generation_results, _results(n))
        produced = time.perf_counter() - t0
        start = time.perf_counter()
        with Worker(["score"], worker_env(bootstrap, prefix, tmp / "home"), tmp / "score.log"):
            first, last = await _wait_for(bootstrap, topics.learning_events, n, 3)
        print(f"results: {n} (40 words each, half with a baseline), 3 partitions, 1 worker")
        print(f"produce: {produced:.2f}s ({n / produced:,.0f}/s)")
        print(f"worker start to first event: {first - start:.2f}s")
        print(
            f"first to last event: {last - first:.2f}s -> {n / (last - first):,.0f} results/s steady"
        )
        print(
            f"worker start to last event: {last - start:.2f}s -> {n / (last - start):,.0f} results/s overall"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=int, default=10_000)
    asyncio.run(main(parser.parse_args().results))
