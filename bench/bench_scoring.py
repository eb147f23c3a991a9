"""Throughput of the scoring worker on the real broker, beside its two references.

One run, one corpus: ``--results`` GenerationResults of about ``--tokens``
tokens a side (seeded English-like pairs from ``bench_rouge.make_pairs``, the
response a near-duplicate of the baseline), every one qualifying, so that each
becomes one LearningEvent. Measured in order:

* **rouge-score**: the reference package alone, pairs/s on the first
  ``--reference-pairs`` pairs (its scores are kept for the parity check);
* **plain aiokafka loop**: the ceiling of broker and client: a consumer in a
  group reads the results and a producer writes each value unchanged to
  another topic, a batch's sends in flight together, offsets committed per
  batch, no scoring; results/s from its first record to its last delivery;
* **lorastream score**: the real worker as a process; results/s from the
  first LearningEvent visible to the last, and from the worker's start; its
  peak resident memory (VmHWM) while it ran;
* **parity**: the LearningEvents' ``rouge_score`` against rouge-score's on
  the reference pairs, compared with ``==``.

``--profile`` also prints where the scoring itself spends its time
(``streams.routing.route`` over the corpus under cProfile).

    .venv/bin/python bench/bench_scoring.py [--results 20000] [--json out.json]

Uses KAFKA_BOOTSTRAP_SERVERS if set, else starts a local broker on free ports.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rouge_score import rouge_scorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_rouge import make_pairs
from bench.broker import bench_bootstrap
from bench.report import Row, add_json_option, write_json
from bench.workers import peak_rss
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import Worker, worker_env
from schemas import KafkaPosition
from streams.routing import SourceRecord, route
from streams.scoring import Thresholds

PARTITIONS = 3


def _corpus(n: int, tokens: int) -> tuple[list[tuple[str, str]], list[tuple[bytes, bytes]]]:
    pairs = make_pairs(random.Random(7), n, tokens)
    records = []
    for i, (baseline, response) in enumerate(pairs):
        doc = {
            "id": f"b{i}",
            "adapter": f"a{i % 4}",
            "prompt": f"question {i}",
            "response": response,
            "baseline": baseline,
            "entropy_delta": -0.3,
        }
        records.append((f"a{i % 4}".encode(), orjson.dumps(doc)))
    return pairs, records


def _rouge_score_reference(pairs: list[tuple[str, str]]) -> tuple[float, list[float]]:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    started = time.perf_counter()
    scores = [scorer.score(baseline, response)["rougeL"].fmeasure for baseline, response in pairs]
    return len(pairs) / (time.perf_counter() - started), scores


async def _plain_loop(bootstrap: str, source: str, sink: str, n: int) -> float:
    """Results/s of a consume→produce loop that does no work on the records."""
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=f"plain-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    done, first = 0, None
    try:
        while done < n:
            batch = await consumer.getmany(timeout_ms=100, max_records=1000)
            if not batch:
                continue
            if first is None:
                first = time.perf_counter()
            futures = [
                await producer.send(sink, key=record.key, value=record.value)
                for records in batch.values()
                for record in records
            ]
            await asyncio.gather(*futures)
            await consumer.commit()
            done += len(futures)
        return n / (time.perf_counter() - (first or time.perf_counter()))
    finally:
        await producer.stop()
        await consumer.stop()


async def _read_events(
    bootstrap: str, topic: str, n: int, timeout: float
) -> tuple[float, float, dict[str, float]]:
    """Until ``n`` LearningEvents are visible: when the first and the last were seen, and
    each one's rouge_score by id."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    scores: dict[str, float] = {}
    first = None
    deadline = time.monotonic() + timeout
    try:
        while len(scores) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(scores)} of {n} LearningEvents in {timeout:.0f}s")
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                if records and first is None:
                    first = time.perf_counter()
                for record in records:
                    event = orjson.loads(record.value)
                    scores[event["id"]] = event["rouge_score"]
        return first or time.perf_counter(), time.perf_counter(), scores
    finally:
        await consumer.stop()


def _profile(records: list[tuple[bytes, bytes]]) -> None:
    thresholds = Thresholds()
    sources = [
        SourceRecord(key, value, KafkaPosition("generation-results", 0, i), None)
        for i, (key, value) in enumerate(records)
    ]
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for source in sources:
        route(source, thresholds)
    profiler.disable()
    seconds = time.perf_counter() - started
    print(f"\nroute() alone: {len(sources) / seconds:,.0f} records/s (under cProfile)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


async def main(args: argparse.Namespace) -> None:
    n = args.results
    pairs, records = _corpus(n, args.tokens)
    reference_rate, reference = _rouge_score_reference(pairs[: args.reference_pairs])
    if args.profile:
        _profile(records[: min(n, 5000)])
    tmp = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    with bench_bootstrap(tmp) as bootstrap:
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        topics = await make_topics(bootstrap, prefix, partitions=PARTITIONS)
        await make_topics(bootstrap, prefix + "plain.", partitions=PARTITIONS)
        await produce(bootstrap, topics.generation_results, records)
        plain_rate = await _plain_loop(
            bootstrap, topics.generation_results, prefix + "plain.learning-events", n
        )
        start = time.perf_counter()
        env = worker_env(bootstrap, prefix, tmp / "home")
        with Worker(["score"], env, tmp / "score.log") as worker:
            first, last, scores = await _read_events(
                bootstrap, topics.learning_events, n, timeout=max(120.0, n / 50)
            )
            rss, _ = peak_rss(worker)
    steady = n / (last - first)
    overall = n / (last - start)
    sample = [f"b{i}" for i in range(len(reference))]
    identical = sum(scores[i] == want for i, want in zip(sample, reference, strict=True))
    rows = [
        Row("results/s, first to last LearningEvent", f"{steady:,.0f}"),
        Row(
            "x rouge-score alone",
            f"{steady / reference_rate:.1f}x",
            ">= 50x",
            f"{reference_rate:,.0f} pairs/s",
            steady / reference_rate >= 50,
        ),
        Row(
            "plain aiokafka loop / lorastream",
            f"{plain_rate / steady:.2f}x",
            "<= 2x",
            f"{plain_rate:,.0f} records/s",
            plain_rate / steady <= 2,
        ),
        Row("results/s, worker start to last", f"{overall:,.0f}"),
        Row(
            "scores identical to rouge-score",
            f"{identical} of {len(sample)}",
            "all",
            "rouge-score",
            identical == len(sample),
        ),
        Row(
            "scoring worker peak RSS",
            f"{rss / 2**20:.0f} MB",
            "< 300 MB",
            "",
            0 < rss < 300 * 2**20,
        ),
    ]
    print(
        f"{n} results of ~{args.tokens} tokens a side (every one qualifying and scored), "
        f"{PARTITIONS} partitions, 1 worker"
    )
    for row in rows:
        goal = f"  (goal {row.goal}: {'met' if row.met else 'NOT met'})" if row.goal else ""
        ref = f"  [reference: {row.reference}]" if row.reference else ""
        print(f"{row.figure}: {row.value}{ref}{goal}")
    if args.json:
        notes = [
            f"{n} GenerationResults of ~{args.tokens} tokens a side, every one qualifying, "
            f"{PARTITIONS} partitions, one worker; rouge-score timed on the first "
            f"{len(reference)} pairs of the same corpus",
            "the plain loop reads and writes the same records with aiokafka and no "
            "scoring: the ceiling of the broker and the client on this machine",
        ]
        write_json(args.json, "Scoring throughput", rows, notes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=int, default=20_000)
    parser.add_argument("--tokens", type=int, default=200, help="tokens a side, about")
    parser.add_argument("--reference-pairs", type=int, default=300)
    parser.add_argument("--profile", action="store_true")
    add_json_option(parser)
    asyncio.run(main(parser.parse_args()))
