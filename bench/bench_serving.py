"""Serving freshness: from the 16th event of a window to the first proxy answer by its version.

Issue #22's definition: from the moment the 16th event of a window is produced to the first
response of serve's OpenAI-compatible proxy (``model: <adapter>``) answered by a version
that includes that window; p50 and p99 with 100 tenants, real ``score``, ``train`` and
``serve`` processes, and a contract server with a realistic load latency. Goal: p99 under
1 s plus the load latency.

On the real pipeline: a local broker on free ports (or KAFKA_BOOTSTRAP_SERVERS), fresh
``bench…`` topics, ``lorastream score``, ``lorastream train`` (the built-in tiny model on
the CPU, windows of 16) and ``lorastream serve --backend vllm --listen`` as processes, and
in this process the vLLM contract server of ``tests/serving/contract.py`` whose every load
takes ``--load-ms`` (200 ms) before the adapter is listed.

Arrivals are spread, not a burst: each round first fills 15 of the 16 events of every
tenant's window (waited for until scored, untimed), then closes the tenants' windows one
by one, one 16th event every ``--interval`` seconds, each send awaited (acks=all, no
linger). At each acknowledgement a poller starts sending ``model: <adapter>`` to the
proxy every ``--poll-ms`` and stops at the first answer whose ``model`` is that window's
version (or a newer one); the poll interval bounds the resolution. Round 0 (every
tenant's first version, after a warm-up window that loads the model) is reported apart;
the figures are over the later ``--rounds``.

The time is split where this process can see it: the 16th's LearningEvent visible
(read_committed), the AdapterUpdate visible, the load request reaching the server, the
load answered (adapter listed), the first served answer.

    .venv/bin/python bench/bench_serving.py [--adapters 100] [--rounds 2] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_freshness import (
    _NOT_PASSED,
    PARTITIONS,
    WINDOW,
    Seen,
    _check_alive,
    _check_qualifies,
    _doc,
    _logged,
    _observe,
    _quantile,
)
from bench.broker import bench_bootstrap
from bench.report import Row, write_json
from bench.workers import bench_workers, peak_rss
from lorastream.demo.data import TRAINING
from lorastream.dev.ports import free_port
from lorastream.dev.topics import make_topics
from lorastream.dev.workers import Worker, worker_env
from schemas import Topics
from tests.serving.contract import ContractServer

TITLE = "Serving freshness: 16th event to the first proxy answer by its version (#22)"
GOAL_SECONDS = 1.0
_VERSION = re.compile(r"-v(?P<version>[0-9]+)$")


@dataclass(frozen=True)
class Params:
    adapters: int = 100
    rounds: int = 2
    interval: float = 0.5
    load_ms: float = 200.0
    poll_ms: float = 20.0
    json: Path | None = None


class SlowLoads(ContractServer):
    """The vLLM contract server, each load taking ``load_seconds`` before the adapter is
    listed (a real server reads the weights first); records when each load was asked for
    and when it was answered, on this process's ``perf_counter``."""

    def __init__(self, base: str, load_seconds: float) -> None:
        super().__init__("vllm", base=base)
        self.load_seconds = load_seconds
        self.asked: dict[str, float] = {}
        self.answered: dict[str, float] = {}

    async def _load(self, request: web.Request) -> web.Response:
        asked = time.perf_counter()
        name = str((await self._body(request)).get("lora_name"))  # aiohttp keeps the body
        await asyncio.sleep(self.load_seconds)
        response = await super()._load(request)
        if response.status == 200 and name not in self.answered:
            self.asked[name] = asked
            self.answered[name] = time.perf_counter()
        return response


@dataclass
class Closing:
    """One window closed: its adapter and version, when its 16th event was acknowledged,
    and when the proxy first answered with that version (or a newer one)."""

    round: int
    adapter: str
    version: int
    ids: list[str]
    acked: float = 0.0
    served: float | None = None
    polls: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


async def _poll(session: aiohttp.ClientSession, proxy: str, closing: Closing, every: float) -> None:
    """Ask the proxy for ``closing.adapter`` every ``every`` s until a version that
    includes the window answers (or 120 s pass)."""
    body = {"model": closing.adapter, "messages": [{"role": "user", "content": "hi"}]}
    deadline = closing.acked + 120
    while time.perf_counter() < deadline:
        sent = time.perf_counter()
        async with session.post(f"{proxy}/v1/chat/completions", json=body) as response:
            answer = await response.read()
            now = time.perf_counter()
        closing.polls += 1
        closing.statuses[response.status] = closing.statuses.get(response.status, 0) + 1
        if response.status == 200:
            match = _VERSION.search(str(orjson.loads(answer).get("model", "")))
            if match and int(match["version"]) >= closing.version:
                closing.served = now
                return
        await asyncio.sleep(max(0.0, sent + every - time.perf_counter()))


async def _wait(
    check: Callable[[], bool], workers: dict[str, Worker], timeout: float, what: str
) -> None:
    deadline = time.perf_counter() + timeout
    while not check():
        _check_alive(workers)
        refused = [line for line in workers["serve"].output().splitlines() if " ERROR " in line]
        if refused:
            raise RuntimeError(f"serve: {refused[0]}")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"not within {timeout:.0f}s: {what}")
        await asyncio.sleep(0.02)


async def _send(producer: AIOKafkaProducer, topic: str, docs: list[dict[str, Any]]) -> None:
    futures = [
        await producer.send(topic, key=d["adapter"].encode(), value=orjson.dumps(d)) for d in docs
    ]
    for future in futures:
        await future


async def _session(
    bootstrap: str,
    topics: Topics,
    workers: dict[str, Worker],
    proxy: str,
    params: Params,
) -> tuple[list[Closing], Seen]:
    seen, stop = Seen(), asyncio.Event()
    observer = asyncio.create_task(_observe(bootstrap, topics, seen, stop, 500))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    connector = aiohttp.TCPConnector(limit=0)
    session = aiohttp.ClientSession(connector=connector, trust_env=False)
    closings: list[Closing] = []
    pollers: list[asyncio.Task[None]] = []
    every = params.poll_ms / 1000

    async def close(round_: int, adapter: str) -> Closing:
        docs = [_doc(adapter, round_, i) for i in range(WINDOW)]
        closing = Closing(round_, adapter, round_ + 1, [d["id"] for d in docs])
        await _send(producer, topics.generation_results, docs[-1:])
        closing.acked = time.perf_counter()
        closings.append(closing)
        pollers.append(asyncio.create_task(_poll(session, proxy, closing, every)))
        return closing

    try:
        await _wait_proxy(session, proxy, workers)
        # Warm-up: one window of an adapter outside the tenants loads the trainer's model.
        started = time.perf_counter()
        await _send(producer, topics.generation_results, [_doc("warmup", 0, i) for i in range(15)])
        warm = await close(0, "warmup")
        await _wait(lambda: warm.served is not None, workers, 180, "the warm-up window served")
        closings.clear()
        print(f"warm-up window served in {time.perf_counter() - started:.1f}s (discarded)")
        adapters = [f"t{i:03d}" for i in range(params.adapters)]
        for round_ in range(params.rounds + 1):
            fill = [_doc(a, round_, i) for a in adapters for i in range(WINDOW - 1)]
            await _send(producer, topics.generation_results, fill)
            ids = {d["id"] for d in fill}
            scored = lambda: ids <= seen.events.keys()  # noqa: B023, E731 (awaited at once)
            await _wait(scored, workers, 120, "the fill scored")
            begin = time.perf_counter()
            for k, adapter in enumerate(adapters):
                pause = begin + k * params.interval - time.perf_counter()
                if pause > 0:
                    await asyncio.sleep(pause)
                _check_alive(workers)
                await close(round_, adapter)
            await _wait(
                lambda: all(t.done() for t in pollers), workers, 180, f"round {round_} served"
            )
            for task in pollers:
                task.result()
            done = [c for c in closings if c.round == round_]
            print(f"round {round_}: {len(done)} windows closed and served")
    finally:
        await session.close()
        await producer.stop()
        stop.set()
        await observer
    return closings, seen


async def _wait_proxy(
    session: aiohttp.ClientSession, proxy: str, workers: dict[str, Worker]
) -> None:
    """Until serve's proxy passes ``GET /v1/models`` through to the server."""
    deadline = time.perf_counter() + 120
    while True:
        _check_alive(workers)
        try:
            async with session.get(f"{proxy}/v1/models") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.perf_counter() > deadline:
            raise RuntimeError("serve's proxy did not answer within 120s")
        await asyncio.sleep(0.1)


def run(params: Params) -> None:
    _check_qualifies()
    clock = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    try:
        with bench_bootstrap(tmp) as bootstrap, bench_workers(bootstrap, prefix) as workers:
            topics = asyncio.run(make_topics(bootstrap, prefix, partitions=PARTITIONS))
            print(f"broker {bootstrap}, topics {prefix}* ({PARTITIONS} partitions), in {tmp}")
            env = {k: v for k, v in os.environ.items() if k not in _NOT_PASSED}
            training = {**TRAINING.environment(), "LORASTREAM_WINDOW_SIZE": str(WINDOW)}
            training |= {"LORASTREAM_EVAL_FRACTION": "0", "LORASTREAM_DEVICE": "cpu"}
            adapters = str(tmp / "adapters")
            env |= worker_env(bootstrap, prefix, tmp / "home", LORASTREAM_ADAPTER_DIR=adapters)
            env |= {**training, "OMP_NUM_THREADS": "1"}
            _report(params, asyncio.run(_with_server(topics, workers, env, tmp, params)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"bench took {time.perf_counter() - clock:.1f}s in all")


@dataclass(frozen=True)
class Measured:
    closings: list[Closing]
    seen: Seen
    server: SlowLoads
    serve_mb: float
    """serve's peak RSS."""
    steps: dict[tuple[str, int], float]
    """(adapter, version) -> the LoRA step in ms, from the trainer's log."""


async def _with_server(
    topics: Topics, workers: dict[str, Worker], env: dict[str, str], tmp: Path, params: Params
) -> Measured:
    # The trainer announces its base model's directory; a vLLM started on it lists that path.
    base = str((tmp / "home" / "models" / "tiny-llama-seed0").resolve())
    server = SlowLoads(base, params.load_ms / 1000)
    await server.up()
    port = free_port()
    serve = ["serve", "--backend", "vllm", "--url", server.url, "--listen", f"127.0.0.1:{port}"]
    serve += ["--max-lora-rank", str(TRAINING.lora_r)]  # the server started for that rank
    try:
        for name, args in (("scorer", ["score"]), ("trainer", ["train"]), ("serve", serve)):
            workers[name] = Worker(args, env, tmp / f"{name}.log").start()
        bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
        closings, seen = await _session(
            bootstrap, topics, workers, f"http://127.0.0.1:{port}", params
        )
        memory = peak_rss(workers["serve"])[0] / 2**20
        for worker in workers.values():
            worker.terminate()
        logged = _logged(workers["trainer"].output())
    finally:
        await server.down()
    steps = {key: line.step * 1000 for key, line in logged.items()}
    return Measured(closings, seen, server, memory, steps)


# The stages of one window, between the marks of :func:`_marks`.
PARTS = [
    "scored (16th acknowledged -> its LearningEvent visible)",
    "trained (LearningEvent -> AdapterUpdate visible)",
    "picked up (AdapterUpdate visible -> serve's load request at the server)",
    "loaded (load request -> answered: the server's load latency)",
    "answered (load answered -> first proxy answer by it; poll-bounded)",
]


def _marks(c: Closing, seen: Seen, server: SlowLoads) -> list[float]:
    """When the window passed each point, on this process's clock: its 16th acknowledged,
    its LearningEvent and AdapterUpdate visible, its load asked and answered, served."""
    key, name = (c.adapter, c.version), f"{c.adapter}-v{c.version}"
    if c.served is None:
        raise RuntimeError(f"{name} was never served")
    if sorted(seen.update_ids.get(key, [])) != sorted(c.ids):
        raise RuntimeError(f"{name} is not the window closed in round {c.round}")
    if name not in server.answered:
        raise RuntimeError(f"{name} was served but never loaded by serve")
    events, update = seen.events[c.ids[-1]], seen.updates[key]
    return [c.acked, events, update, server.asked[name], server.answered[name], c.served]


def _ms(value: float) -> str:
    return f"{value:.0f} ms"


def _report(params: Params, measured: Measured) -> None:
    closings, steps = measured.closings, measured.steps
    marks = {id(c): _marks(c, measured.seen, measured.server) for c in closings}
    timed = [c for c in closings if c.round > 0]
    latency = [(marks[id(c)][-1] - c.acked) * 1000 for c in timed]
    first = [(marks[id(c)][-1] - c.acked) * 1000 for c in closings if c.round == 0]
    parts = {
        name: [(marks[id(c)][i + 1] - marks[id(c)][i]) * 1000 for c in timed]
        for i, name in enumerate(PARTS)
    }
    step = [steps[(c.adapter, c.version)] for c in timed if (c.adapter, c.version) in steps]
    first_step = [
        steps[k] for c in closings if c.round == 0 and (k := (c.adapter, c.version)) in steps
    ]
    p99 = _quantile(latency, 0.99)
    goal_ms = GOAL_SECONDS * 1000 + params.load_ms
    count = f"{len(timed)} windows, {params.adapters} tenants"
    rate = 1 / params.interval
    rows = [
        Row("p50", _ms(_quantile(latency, 0.5)), reference=count),
        Row("p99", _ms(p99), goal=f"p99 < 1 s + {params.load_ms:g} ms load = {goal_ms:g} ms",
            reference=count, met=p99 < goal_ms),
        Row("max", _ms(max(latency)), reference=count),
        Row("windows closing", f"{rate:.1f}/s", reference=f"one every {params.interval * 1000:g} ms"),
        *[Row(f"  {name}, p50", _ms(_quantile(v, 0.5)), reference=f"p99 {_ms(_quantile(v, 0.99))}")
          for name, v in parts.items()],
        Row("    of which the LoRA step (the trainer's log), p50", _ms(_quantile(step, 0.5)),
            reference=f"p99 {_ms(_quantile(step, 0.99))}, {len(step)} windows"),
        Row("first versions (round 0, not above), p50", _ms(_quantile(first, 0.5)),
            reference=f"p99 {_ms(_quantile(first, 0.99))}, {len(first)} windows"),
        Row("serve peak RSS", f"{measured.serve_mb:.0f} MB", reference=f"{params.adapters} tenants, keep 2"),
    ]  # fmt: skip
    polls = sum(c.polls for c in closings)
    statuses = sum((Counter(c.statuses) for c in closings), Counter[int]())
    notes = [
        f"{params.adapters} tenants (adapters), {params.rounds} timed round(s) after round 0 "
        f"(each tenant's first version, reported apart) and one warm-up window; per round, "
        f"15 of the 16 events of every tenant's window are produced and scored first "
        f"(untimed), then one window closes every {params.interval * 1000:g} ms "
        f"({rate:.1f} windows/s), the tenants in turn",
        "start: the 16th GenerationResult acknowledged (acks=all, linger 0, each send "
        "awaited); end: the first answer of serve's proxy (POST /v1/chat/completions, "
        "model: <adapter>) whose model is that window's version or a newer one",
        f"the proxy is polled every {params.poll_ms:g} ms per waiting tenant, so the end is "
        f"known to within {params.poll_ms:g} ms plus one request "
        f"({polls} requests in all: {', '.join(f'{n} x {s}' for s, n in sorted(statuses.items()))})",
        f"real lorastream score, train and serve processes (serve --backend vllm --listen "
        f"--max-lora-rank {TRAINING.lora_r}, its defaults otherwise: --keep 2, --drain 30, "
        f"--poll 5); the vLLM contract server "
        f"(tests/serving/contract.py) in the bench's process, every load taking "
        f"{params.load_ms:g} ms before the adapter is listed",
        "the parts are measured in the bench's process: LearningEvents and AdapterUpdates by "
        "a read_committed consumer, load request and answer by the contract server",
        f"tiny built-in model on the CPU, windows of {WINDOW}, LORASTREAM_EVAL_FRACTION=0, "
        f"demo LoRA settings, {PARTITIONS} partitions per topic, OMP_NUM_THREADS=1",
    ]
    print(f"\n{TITLE}")
    width = max(len(row.figure) for row in rows)
    for row in rows:
        met = {True: "MET", False: "NOT MET", None: ""}[row.met]
        goal = f"  goal {row.goal}: {met}" if row.goal else ""
        print(f"  {row.figure:<{width}}  {row.value:>10}  ({row.reference}){goal}")
    print("notes:")
    for note in notes:
        print(f"  - {note}")
    firsts = [
        [b - a for a, b in itertools.pairwise(marks[id(c)])] for c in closings if c.round == 0
    ]
    spread = [[part[i] * 1000 for part in firsts] for i in range(len(PARTS))] + [first_step]
    print(
        "first versions (round 0), p50/p99 (ms) of scored, trained, picked up, loaded, "
        "answered; the LoRA step: "
        + ", ".join(f"{_quantile(v, 0.5):.0f}/{_quantile(v, 0.99):.0f}" for v in spread)
    )
    slowest = sorted(timed, key=lambda c: marks[id(c)][-1] - c.acked, reverse=True)[:5]
    print("slowest windows (ms): total = scored + trained + picked up + loaded + answered")
    for c in slowest:
        split = [f"{(b - a) * 1000:.0f}" for a, b in itertools.pairwise(marks[id(c)])]
        total = (marks[id(c)][-1] - c.acked) * 1000
        print(f"  {c.adapter}-v{c.version}: {total:.0f} = {' + '.join(split)}")
    if params.json is not None:
        write_json(params.json, TITLE, rows, notes)
        print(f"wrote {params.json}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=100, help="tenants (adapters)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after round 0")
    parser.add_argument(
        "--interval", type=float, default=0.5, help="seconds between two windows closing"
    )
    parser.add_argument("--load-ms", type=float, default=200.0, help="the server's load latency")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="proxy poll per waiting tenant")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 10 tenants, 1 timed round"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.rounds = 10, 1
    if args.adapters < 1 or args.rounds < 1 or args.interval <= 0 or args.poll_ms <= 0:
        parser.error("--adapters and --rounds must be at least 1, --interval and --poll-ms above 0")
    run(Params(args.adapters, args.rounds, args.interval, args.load_ms, args.poll_ms, args.json))
