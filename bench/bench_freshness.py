"""Freshness: from the 16th qualifying event of a window to its AdapterUpdate being visible.

The issue's definition: the time from producing the 16th qualifying event of a window to
its AdapterUpdate being visible to a read_committed consumer, minus the step's own time,
p50 and p99 over a steady stream; goal p99 under 250 ms (linger, fetch waits, poll timeouts
and transaction commit all count).

On the real pipeline: a local broker on free ports (or KAFKA_BOOTSTRAP_SERVERS), fresh
``bench…`` topics, ``lorastream score`` and ``lorastream train`` as processes (the built-in
tiny model on the CPU, windows of 16, the demo's LoRA settings, the trainer's own hold-out
off). Every ``--interval`` seconds one full window (16 GenerationResults, every one
qualifying) is produced for one of ``--adapters`` adapters in turn, each send awaited
(acks=all, no linger), so the moment the 16th is acknowledged is known. An aiokafka
consumer with ``isolation_level="read_committed"`` in the same process, polling with a
5 ms timeout, records when each LearningEvent and each AdapterUpdate becomes visible.

The step's own time of each version is the trainer's (its log line ``<adapter> vN: …
in X.XXXs``, the LoRA step alone). Per window it reports the raw latency, the latency
minus that version's step time, and the scoring stage's share (16th result acknowledged
to its LearningEvent visible). The first ``--warmup`` windows (model load, first
transactions) are produced one at a time, waited for and discarded. It also reads the
peak resident memory (VmHWM) of both workers before stopping them. Topics and the
temporary directory are removed at the end.

    .venv/bin/python bench/bench_freshness.py [--windows 36] [--warmup 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.broker import bench_bootstrap
from bench.report import Row, write_json
from bench.workers import bench_workers, peak_rss
from lorastream.demo.data import TRAINING
from lorastream.dev.topics import make_topics
from lorastream.dev.workers import Worker, worker_env
from schemas import AdapterUpdate, KafkaPosition, Topics, decode
from streams.scoring import Thresholds, process

TITLE = "Freshness: 16th event to AdapterUpdate visible"
WINDOW = 16
GOAL_MS = 250.0
SCORER_GOAL_MB = 300.0
TRAINER_GOAL_MB = 1536.0
PARTITIONS = 3
WORDS = ["river", "stone", "cloud", "ember", "maple", "harbor", "lantern", "meadow"]

# Variables of the caller that would change what the workers do (cf. lorastream.demo).
_NOT_PASSED = (
    "LORASTREAM_BASE_MODEL",
    "LORASTREAM_MAX_WAIT_SECONDS",
    "LORASTREAM_FAULTS",
    "LORASTREAM_METRICS_PORT",
)
# The trainer's line per version, after its commit (the plain log format of a log file):
# "<date> <time,ms> INFO trainer.consumer: <adapter> v<N>: <where> (16 events) loss L in S s".
_STEP_LINE = re.compile(
    r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \S+: "
    r"(?P<adapter>[A-Za-z0-9._-]+) v(?P<version>\d+): \S+ \(\d+ events\) "
    r"loss [-+0-9.eE]+ in (?P<seconds>[0-9.]+)s",
    re.MULTILINE,
)


@dataclass(frozen=True)
class Params:
    windows: int = 36
    warmup: int = 8
    adapters: int = 2
    interval: float = 0.75
    fetch_max_wait_ms: int = 500
    json: Path | None = None


@dataclass
class Produced:
    """One window as produced: its adapter, the version it should become, its 16th's ack."""

    index: int
    adapter: str
    version: int
    ids: list[str]
    last_acked: float = 0.0  # perf_counter when the 16th result was acknowledged


@dataclass
class Seen:
    """What the read_committed observer saw, with perf_counter times."""

    events: dict[str, float] = field(default_factory=dict)  # LearningEvent id -> visible
    updates: dict[tuple[str, int], float] = field(default_factory=dict)  # (adapter, v) -> visible
    update_ids: dict[tuple[str, int], list[str]] = field(default_factory=dict)


def _doc(adapter: str, window: int, i: int) -> dict[str, Any]:
    word = WORDS[(window * 3 + i) % len(WORDS)]
    return {
        "id": f"{adapter}-w{window:03d}-{i:02d}",
        "adapter": adapter,
        "prompt": f"describe: {word} {i}",
        "response": f"The {word} is number {i} of window {window}.",
        "entropy_delta": -0.3,  # |Δentropy| above the threshold: qualifies
    }


def _check_qualifies() -> None:
    outcome = process(orjson.dumps(_doc("a0", 0, 0)), KafkaPosition("t", 0, 0), None, Thresholds())
    if outcome.event is None:
        raise RuntimeError("the bench's GenerationResult does not qualify under the scoring rule")


async def _observe(
    bootstrap: str, topics: Topics, seen: Seen, stop: asyncio.Event, fetch_max_wait_ms: int
) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )
    await consumer.start()
    try:
        tps = [
            TopicPartition(topic, p)
            for topic in (topics.learning_events, topics.adapter_updates)
            for p in range(PARTITIONS)
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=5)
            now = time.perf_counter()
            for tp, records in batch.items():
                for record in records:
                    if record.value is None:
                        continue
                    if tp.topic == topics.learning_events:
                        seen.events[orjson.loads(record.value)["id"]] = now
                    else:
                        update = decode(record.value, AdapterUpdate)
                        key = (update.adapter, update.version)
                        seen.updates.setdefault(key, now)
                        seen.update_ids[key] = list(update.window.event_ids)
    finally:
        await consumer.stop()


async def _produce_window(producer: AIOKafkaProducer, topic: str, window: Produced) -> None:
    for i, event_id in enumerate(window.ids):
        doc = _doc(window.adapter, window.index, i)
        assert doc["id"] == event_id
        await (await producer.send(topic, key=window.adapter.encode(), value=orjson.dumps(doc)))
    window.last_acked = time.perf_counter()


def _check_alive(workers: dict[str, Worker]) -> None:
    for name, worker in workers.items():
        if not worker.alive():
            tail = "\n    ".join(worker.output().splitlines()[-15:])
            raise RuntimeError(f"the {name} stopped:\n    {tail}")


async def _wait_updates(
    seen: Seen, keys: list[tuple[str, int]], workers: dict[str, Worker], timeout: float
) -> None:
    deadline = time.perf_counter() + timeout
    while any(k not in seen.updates for k in keys):
        _check_alive(workers)
        if time.perf_counter() > deadline:
            missing = [k for k in keys if k not in seen.updates]
            raise RuntimeError(f"{len(missing)} versions not visible after {timeout:.0f}s")
        await asyncio.sleep(0.02)


async def _session(
    bootstrap: str, topics: Topics, workers: dict[str, Worker], params: Params
) -> tuple[list[Produced], Seen, float]:
    seen, stop = Seen(), asyncio.Event()
    observer = asyncio.create_task(
        _observe(bootstrap, topics, seen, stop, params.fetch_max_wait_ms)
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    adapters = [f"a{i}" for i in range(params.adapters)]
    versions = dict.fromkeys(adapters, 0)
    produced: list[Produced] = []

    def next_window() -> Produced:
        index = len(produced)
        adapter = adapters[index % len(adapters)]
        versions[adapter] += 1
        ids = [f"{adapter}-w{index:03d}-{i:02d}" for i in range(WINDOW)]
        window = Produced(index, adapter, versions[adapter], ids)
        produced.append(window)
        return window

    try:
        started = time.perf_counter()
        for _ in range(params.warmup):  # one at a time: the first loads the model
            window = next_window()
            await _produce_window(producer, topics.generation_results, window)
            await _wait_updates(seen, [(window.adapter, window.version)], workers, 180)
        warm = time.perf_counter() - started
        print(f"warm-up: {params.warmup} windows in {warm:.1f}s (discarded)")
        begin = time.perf_counter()
        for k in range(params.windows):
            pause = begin + k * params.interval - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)
            _check_alive(workers)
            await _produce_window(producer, topics.generation_results, next_window())
        keys = [(w.adapter, w.version) for w in produced]
        await _wait_updates(seen, keys, workers, 60)
        steady = time.perf_counter() - begin
    finally:
        await producer.stop()
        stop.set()
        await observer
    return produced[params.warmup :], seen, steady


def _peak_rss_mb(worker: Worker) -> tuple[float, str]:
    total, processes = peak_rss(worker)
    assert worker.proc is not None
    how = f"pid {worker.proc.pid}" + (
        f" + {processes - 1} child process(es), summed" if processes > 1 else ", no children"
    )
    return total / 2**20, how


@dataclass(frozen=True)
class Logged:
    """A version's line in the trainer's log: its step time, and when it was written
    (after the commit), on the bench's perf_counter clock."""

    step: float
    at: float


def _logged(log_text: str) -> dict[tuple[str, int], Logged]:
    # The log's local wall-clock time (ms) onto perf_counter: one offset, taken now.
    offset = time.time() - time.perf_counter()
    found = {}
    for m in _STEP_LINE.finditer(log_text):
        wall = datetime.strptime(m["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        found[(m["adapter"], int(m["version"]))] = Logged(float(m["seconds"]), wall - offset)
    return found


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run(params: Params) -> None:
    _check_qualifies()
    clock = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-freshness-"))
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    try:
        with bench_bootstrap(tmp) as bootstrap, bench_workers(bootstrap, prefix) as workers:
            topics = asyncio.run(make_topics(bootstrap, prefix, partitions=PARTITIONS))
            print(f"broker {bootstrap}, topics {prefix}* ({PARTITIONS} partitions), in {tmp}")
            env = {k: v for k, v in os.environ.items() if k not in _NOT_PASSED}
            env.update(
                worker_env(
                    bootstrap,
                    prefix,
                    tmp / "home",
                    LORASTREAM_ADAPTER_DIR=str(tmp / "adapters"),
                    LORASTREAM_DEVICE="cpu",
                    OMP_NUM_THREADS="1",
                    **{
                        **TRAINING.environment(),
                        "LORASTREAM_WINDOW_SIZE": str(WINDOW),
                        "LORASTREAM_EVAL_FRACTION": "0",
                    },
                )
            )
            for name, args in (("scorer", ["score"]), ("trainer", ["train"])):
                workers[name] = Worker(args, env, tmp / f"{name}.log").start()
            windows, seen, steady = asyncio.run(_session(bootstrap, topics, workers, params))
            memory = {name: _peak_rss_mb(worker) for name, worker in workers.items()}
            for worker in workers.values():
                worker.terminate()
            logged = _logged(workers["trainer"].output())
            _report(params, windows, seen, steady, memory, logged)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"bench took {time.perf_counter() - clock:.1f}s in all")


def _report(
    params: Params,
    windows: list[Produced],
    seen: Seen,
    steady: float,
    memory: dict[str, tuple[float, str]],
    logged: dict[tuple[str, int], Logged],
) -> None:
    raw, net, scoring, step_list, fallback = [], [], [], [], 0
    trainer, reader = [], []  # LearningEvent visible -> logged, minus step; logged -> visible
    split: list[str] = []  # per window, for the table
    median_step = statistics.median(v.step for v in logged.values()) if logged else 0.0
    for w in windows:
        key = (w.adapter, w.version)
        if sorted(seen.update_ids.get(key, [])) != sorted(w.ids):
            raise RuntimeError(f"{w.adapter} v{w.version} is not the window produced as {w.index}")
        latency = (seen.updates[key] - w.last_acked) * 1000
        line = logged.get(key)
        if line is None:
            fallback += 1
            step = median_step
        else:
            step = line.step
            trainer.append((line.at - seen.events[w.ids[-1]] - step) * 1000)
            reader.append((seen.updates[key] - line.at) * 1000)
            split.append(f"{trainer[-1]:7.1f} {reader[-1]:6.1f}")
        if line is None:
            split.append("")
        step_list.append(step * 1000)
        raw.append(latency)
        net.append(latency - step * 1000)
        scoring.append((seen.events[w.ids[-1]] - w.last_acked) * 1000)
    rest = [n - s for n, s in zip(net, scoring, strict=True)]

    def ms(value: float) -> str:
        return f"{value:.1f} ms"

    p99_net = _quantile(net, 0.99)
    scorer_mb, scorer_how = memory["scorer"]
    trainer_mb, trainer_how = memory["trainer"]
    reference = f"{len(windows)} windows"
    rows: list[dict[str, Any]] = [
        {"figure": "p50, minus step", "value": ms(_quantile(net, 0.5)), "goal": "",
         "reference": reference, "met": None},
        {"figure": "p99, minus step", "value": ms(p99_net), "goal": f"p99 < {GOAL_MS:g} ms",
         "reference": reference, "met": p99_net < GOAL_MS},
        {"figure": "max, minus step", "value": ms(max(net)), "goal": "",
         "reference": reference, "met": None},
        {"figure": "p50, raw", "value": ms(_quantile(raw, 0.5)), "goal": "",
         "reference": reference, "met": None},
        {"figure": "p99, raw", "value": ms(_quantile(raw, 0.99)), "goal": "",
         "reference": reference, "met": None},
        {"figure": "max, raw", "value": ms(max(raw)), "goal": "",
         "reference": reference, "met": None},
        {"figure": "step, median (trainer's log)", "value": ms(statistics.median(step_list)),
         "goal": "", "reference": f"p99 {ms(_quantile(step_list, 0.99))}", "met": None},
        {"figure": "scoring stage (16th result to its LearningEvent), p50",
         "value": ms(_quantile(scoring, 0.5)), "goal": "",
         "reference": f"p99 {ms(_quantile(scoring, 0.99))}", "met": None},
        {"figure": "training stage minus step (LearningEvent to AdapterUpdate), p50",
         "value": ms(_quantile(rest, 0.5)), "goal": "",
         "reference": f"p99 {ms(_quantile(rest, 0.99))}", "met": None},
        *(
            [
                {"figure": "  trainer: LearningEvent visible to commit logged, minus step, p50",
                 "value": ms(_quantile(trainer, 0.5)), "goal": "",
                 "reference": f"p99 {ms(_quantile(trainer, 0.99))}", "met": None},
                {"figure": "  reader: commit logged to AdapterUpdate visible, p50",
                 "value": ms(_quantile(reader, 0.5)), "goal": "",
                 "reference": f"p99 {ms(_quantile(reader, 0.99))}", "met": None},
            ]
            if trainer
            else []
        ),
        {"figure": "scorer peak RSS", "value": f"{scorer_mb:.0f} MB",
         "goal": f"< {SCORER_GOAL_MB:g} MB", "reference": scorer_how,
         "met": scorer_mb < SCORER_GOAL_MB},
        {"figure": "trainer peak RSS (tiny model)", "value": f"{trainer_mb:.0f} MB",
         "goal": "< 1.5 GB", "reference": trainer_how, "met": trainer_mb < TRAINER_GOAL_MB},
    ]  # fmt: skip
    notes = [
        f"{len(windows)} timed windows of {WINDOW} after {params.warmup} warm-up windows "
        f"(discarded); one full window every {params.interval:g}s, {params.adapters} adapters "
        f"in turn, {steady:.1f}s of steady stream; windows do not overlap, so no window "
        "queues behind another adapter's step",
        "start: the 16th GenerationResult of the window acknowledged (acks=all, linger 0, "
        "each send awaited); end: its AdapterUpdate returned by getmany(timeout_ms=5) of a "
        f"read_committed aiokafka consumer (fetch_max_wait_ms {params.fetch_max_wait_ms}) "
        "in the bench's process",
        "step: the trainer's own per-version step time (its log line '<adapter> vN: ... in "
        "X.XXXs', the LoRA step alone; writing the version's files, the transaction and "
        "everything else count as latency)"
        + (f"; {fallback} window(s) without a log line used the median" if fallback else ""),
        "scoring stage: 16th result acknowledged to its LearningEvent visible; training stage "
        "minus step: the rest (trainer fetch, window, step excluded, files, transaction, "
        "observer fetch); split at the trainer's log line for the version (written after its "
        "transaction committed; log time in ms, so each part is +/- 1 ms; the reader part "
        "can be a few ms below zero when the bench sees the commit before the trainer's "
        "process, on a busy CPU, gets to log it)",
        "tiny built-in model on the CPU, LORASTREAM_EVAL_FRACTION=0, demo LoRA settings, "
        f"{PARTITIONS} partitions per topic, OMP_NUM_THREADS=1",
    ]
    print(f"\n{TITLE}")
    width = max(len(row["figure"]) for row in rows)
    for row in rows:
        met = {True: "MET", False: "NOT MET", None: ""}[row["met"]]
        goal = f"  goal {row['goal']}: {met}" if row["goal"] else ""
        print(f"  {row['figure']:<{width}}  {row['value']:>10}  ({row['reference']}){goal}")
    print("notes:")
    for note in notes:
        print(f"  - {note}")
    print("per window (ms): raw, step, minus step = scoring + trainer (minus step) + reader")
    print(f"  {'':<7} {'raw':>7} {'step':>6} {'-step':>7} {'score':>6} {'train':>7} {'read':>6}")
    for w, r, s, n, c, t in zip(windows, raw, step_list, net, scoring, split, strict=True):
        print(f"  {w.adapter} v{w.version:<3} {r:7.1f} {s:6.1f} {n:7.1f} {c:6.1f} {t}")
    if params.json is not None:
        write_json(params.json, TITLE, [Row(**row) for row in rows], notes)
        print(f"wrote {params.json}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", type=int, default=36, help="timed windows")
    parser.add_argument(
        "--warmup", type=int, default=8, help="windows discarded first (at least one per adapter)"
    )
    parser.add_argument("--adapters", type=int, default=2, help="adapters, in turn")
    parser.add_argument(
        "--interval", type=float, default=0.75, help="seconds between windows produced"
    )
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        default=500,
        help="the observer's fetch_max_wait_ms (aiokafka's and Kafka's default: 500)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.windows < 1 or args.adapters < 1 or args.warmup < args.adapters:
        parser.error("--windows and --adapters must be at least 1, --warmup at least --adapters")
    run(
        Params(
            args.windows,
            args.warmup,
            args.adapters,
            args.interval,
            args.fetch_max_wait_ms,
            args.json,
        )
    )
