"""Soak: the whole pipeline for minutes under SIGKILLs and broker restarts, then every record
accounted for and every lineage retrained bit for bit.

Starts its own local broker (free ports, a temporary home, the shared jar cache), because it
restarts it. Topics of 6 partitions. A steady producer writes valid GenerationResults for 12
adapters (most qualifying, ids unique) with hostile records of ``tests.hostile`` mixed in,
and a stream of hostile records straight into ``learning-events``. Two scorers and two
trainers (``a``, ``b``) run as real processes on one shared home and adapter directory. A
chaos loop SIGKILLs random members (each restarted after a short random delay), some of them
inside a trainer's transaction, between the send and the commit (the trainer is restarted
with ``LORASTREAM_FAULTS=pause:commit-inside:...`` and killed once it says it paused; half
of those stay down 15-45 s, as a machine that died mid-transaction would, while the rest of
the group goes on); a third trainer ``c`` joins and leaves (SIGTERM); the broker is
restarted at 1/3 and 2/3 of the run; members that exit by themselves are restarted and
counted.

Then the chaos and the producer stop, the survivors drain until the accounting settles, and
the soak checks: every input offset in exactly one outcome (``tests.hostile``'s
accountants); versions 1..n per adapter with the right parents; no event trained twice in a
lineage; every file's sha256 as announced; each adapter's windows those the live rule gives;
and each lineage bit for bit that of an uninterrupted run, retrained in this process on the
CPU. It prints a report and exits 1 on any failure (the logs are kept then).

    .venv/bin/python bench/soak.py [--seconds 600] [--rate 20] [--kills 100] [--seed 0]
                                   [--txn-share 0.3] [--stay-down 0.5] [--s3] [--keep] [-v]

With ``--s3`` the adapters live in a bucket of a real S3Proxy (``lorastream.s3proxy``,
from Maven Central) and each member has its own local cache, as on separate machines: a
trainer killed mid-upload leaves a version without its manifest, which must never be
announced, and every announced version is fetched and checked against its sha256.

The run takes ``--seconds`` plus the drain (at most max(240, seconds/2), less when nothing
moves for a minute) plus about a minute of retraining: about 15 minutes by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from lorastream.broker import LocalBroker, default_home
from lorastream.follow import follow
from schemas import (
    AdapterUpdate,
    LearningEvent,
    QuarantineRecord,
    SchemaError,
    Topics,
    decode,
)
from tests.hostile import (
    Accounting,
    Hostile,
    account_learning_events,
    account_results,
    dead_letter_sources,
    hostile_records,
    positions,
)
from tests.kafka_util import Worker, make_topics, worker_env
from tests.lineage_checks import (
    check_files,
    check_trained_once,
    check_versions,
    check_windows,
    events_by_partition,
    first_of_each_version,
    lineages_of,
)
from tests.trainer.events import PAIRS
from trainer.history import read_committed_topic

ADAPTERS = [f"soak-{n:02d}" for n in range(12)]
PARTITIONS = 6
WINDOW = 16
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _code_digest() -> str:
    """A digest of the product's code, to tell whether it changed on disk during the run
    (restarted members would run the new code)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in ("schemas", "streams", "trainer", "lorastream"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _valid_result(rng: random.Random, n: int) -> Hostile:
    """Result ``n``, keyed by its adapter: a learnable pair for one of the 12 adapters; about
    9 in 10 qualify."""
    prompt, response = PAIRS[rng.randrange(len(PAIRS))]
    doc: dict[str, Any] = {
        "id": f"soak-{n}",
        "adapter": ADAPTERS[rng.randrange(len(ADAPTERS))],
        "prompt": prompt,
        "response": response,
        "entropy_delta": rng.choice([-0.5] * 7 + [-0.3, 0.3, 0.05]),
    }
    if rng.random() < 0.3:
        doc["baseline"] = response if rng.random() < 0.5 else "something else entirely"
    return Hostile(doc["adapter"].encode(), orjson.dumps(doc), [], "valid")


# ── members ─────────────────────────────────────────────────────────────────


@dataclass
class Member:
    """One scorer or trainer: a process that the chaos kills and the supervisor restarts."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    desired: bool = True
    worker: Worker | None = None
    restart_at: float | None = None
    armed: bool = False  # running with a fault spec: the chaos loop owns it meanwhile
    starts: int = 0
    mark: int = 0

    def start(self, faults: str | None = None) -> None:
        env = {**self.env, "LORASTREAM_FAULTS": faults} if faults else self.env
        with self.log.open("ab") as handle:
            stamp = time.strftime("%H:%M:%S")
            handle.write(
                f"\n=== soak: start {self.starts + 1} at {stamp} {faults or ''}\n".encode()
            )
        self.mark = self.log.stat().st_size
        self.worker = Worker(self.args, env, self.log).start()
        self.starts += 1
        self.restart_at = None

    def alive(self) -> bool:
        return self.worker is not None and self.worker.alive()

    def kill(self) -> bool:
        """SIGKILL; True if it was running."""
        if not self.alive():
            return False
        assert self.worker is not None
        self.worker.kill()
        return True

    def since_start(self) -> str:
        try:
            with self.log.open("rb") as handle:
                handle.seek(self.mark)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def last_words(self) -> str:
        """The line of this run's output that says most about how it ended."""
        lines = [_ANSI.sub("", line).strip() for line in self.since_start().splitlines()]
        lines = [line for line in lines if line]
        errors = [line for line in lines if "Error" in line or "error" in line]
        return (errors or lines or [""])[-1][:300]


@dataclass
class Stats:
    produced: Counter[str] = field(default_factory=Counter)
    sigkills: Counter[str] = field(default_factory=Counter)
    sigkills_in_txn: int = 0
    txn_tries_missed: int = 0
    stayed_down: int = 0
    exits: list[tuple[str, int | None, str]] = field(default_factory=list)
    broker_restarts: int = 0
    joins: int = 0
    leaves: int = 0
    log: list[str] = field(default_factory=list)

    @property
    def total_kills(self) -> int:
        return sum(self.sigkills.values())


# ── the soak ────────────────────────────────────────────────────────────────


class Soak:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.rng = random.Random(args.seed)
        self.broker = LocalBroker(
            tmp / "kafka",
            port=_free_port(),
            controller_port=_free_port(),
            jars_dir=default_home() / "jars",
        )
        self.bootstrap = self.broker.bootstrap
        self.prefix = f"soak{uuid.uuid4().hex[:6]}."
        self.topics = Topics.named(self.prefix)
        self.home = tmp / "home"
        self.adapter_dir: str = str(tmp / "adapters")
        self.s3: Any = None
        if args.s3:
            from lorastream.s3proxy import LocalS3

            self.s3 = LocalS3(tmp / "s3", jars=default_home() / "s3proxy")
        self.stats = Stats()
        self.versions: dict[str, int] = {}
        self.started = time.monotonic()
        self.chaos_over = asyncio.Event()
        self.members: dict[str, Member] = {}
        self.code = _code_digest()

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {text}"
        self.stats.log.append(line)
        if self.args.verbose:
            print(line, flush=True)

    def member(self, name: str, args: list[str], **more: str) -> Member:
        if self.s3 is not None:  # a cache of its own, as on a machine of its own
            more = {
                **self.s3.environment(),
                "LORASTREAM_ADAPTER_CACHE": str(self.tmp / "caches" / name),
                **more,
            }
        env = worker_env(
            self.bootstrap,
            self.prefix,
            self.home,
            LORASTREAM_ADAPTER_DIR=self.adapter_dir,
            LORASTREAM_DEVICE="cpu",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            **more,
        )
        m = Member(name, args, env, self.tmp / "logs" / f"{name}.log")
        self.members[name] = m
        return m

    # ── producer ────────────────────────────────────────────────────────────

    async def produce(self) -> None:
        """``rate`` valid results a second, ``hostile`` times as many hostile results, and as
        many hostile learning events, until the chaos is over."""
        args = self.args
        expected = int(args.seconds * args.rate * args.hostile * 1.3) + 200
        doors = {
            self.topics.generation_results: iter(
                hostile_records("generation-results", expected, seed=args.seed + 1)
            ),
            self.topics.learning_events: iter(
                hostile_records("learning-events", expected, seed=args.seed + 2)
            ),
        }
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=20,
            request_timeout_ms=120_000,
        )
        await producer.start()
        rng = random.Random(self.args.seed + 3)
        n = 0
        credit = 0.0
        tick = 0.1
        pending: set[asyncio.Future[Any]] = set()

        def done(door: str) -> Callable[[asyncio.Future[Any]], None]:
            def count(future: asyncio.Future[Any]) -> None:
                pending.discard(future)
                if future.cancelled() or future.exception() is not None:
                    self.stats.produced[f"{door} failed"] += 1
                else:
                    self.stats.produced[f"{door} taken"] += 1

            return count

        async def send(door: str, topic: str, record: Hostile) -> None:
            try:
                future = await producer.send(
                    topic, key=record.key, value=record.value, headers=record.headers
                )
            except MessageSizeTooLargeError:
                self.stats.produced[f"{door} refused as too large"] += 1
                return
            except AssertionError:  # aiokafka's way of refusing a record with no key and no value
                self.stats.produced[f"{door} refused by the client (no key, no value)"] += 1
                return
            except KafkaError as exc:
                self.stats.produced[f"{door} failed"] += 1
                self.say(f"producer: {exc!r}")
                return
            pending.add(future)
            future.add_done_callback(done(door))

        try:
            while not self.chaos_over.is_set():
                credit += args.rate * tick
                while credit >= 1:
                    credit -= 1
                    await send(
                        "valid result", self.topics.generation_results, _valid_result(rng, n)
                    )
                    n += 1
                    for topic, records in doors.items():
                        if rng.random() < args.hostile:
                            record = next(records, None)
                            if record is not None:
                                door = (
                                    "hostile result"
                                    if topic == self.topics.generation_results
                                    else "hostile event"
                                )
                                await send(door, topic, record)
                await asyncio.sleep(tick)
            if pending:
                await asyncio.wait(list(pending), timeout=180)
        finally:
            await producer.stop()

    # ── following the versions ──────────────────────────────────────────────

    async def follow_versions(self) -> None:
        def seen(update: AdapterUpdate, _: bytes) -> None:
            self.versions[update.adapter] = max(
                self.versions.get(update.adapter, 0), update.version
            )

        while True:
            try:
                await follow(self.bootstrap, self.topics.adapter_updates, seen, from_beginning=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.say(f"follower: {exc!r}; following again")
                await asyncio.sleep(2)

    # ── supervisor and chaos ────────────────────────────────────────────────

    async def supervise(self) -> None:
        """Start what should run, restart what exited by itself (and count it)."""
        while True:
            now = time.monotonic()
            for m in list(self.members.values()):
                if m.armed or not m.desired or m.alive():
                    continue
                if m.restart_at is None:
                    if m.worker is not None:
                        assert m.worker.proc is not None
                        code = m.worker.proc.returncode
                        self.stats.exits.append((m.name, code, m.last_words()))
                        self.say(f"{m.name} exited by itself with {code}")
                        m.restart_at = now + self.rng.uniform(2, 5)
                    else:
                        m.restart_at = now
                if now >= m.restart_at:
                    m.start()
                    self.say(f"{m.name} started ({m.starts})")
            await asyncio.sleep(0.3)

    def _kill(self, m: Member, why: str = "") -> bool:
        if not m.kill():
            return False
        self.stats.sigkills[m.name] += 1
        self.say(f"SIGKILL {m.name}{why}")
        return True

    async def kill_in_transaction(self, m: Member, end: float) -> None:
        """Restart trainer ``m`` armed to pause inside its next transaction, between the send
        and the commit; SIGKILL it there (or after a timeout, if it never got that far)."""
        m.armed = True
        try:
            self._kill(m, " (to arm it)")
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))
            names = sorted(set(ADAPTERS) | set(self.versions) | {"alpha", "beta", "gamma"})
            spec = ",".join(
                f"pause:commit-inside:{a}:{self.versions.get(a, 0) + k}"
                for a in names
                for k in (1, 2, 3)
            )
            m.start(faults=spec)
            self.say(f"{m.name} started armed ({m.starts})")
            deadline = min(time.monotonic() + self.args.arm_timeout, end)
            paused = None
            while time.monotonic() < deadline and m.alive():
                out = m.since_start()
                if "FAULT paused" in out:
                    paused = out[out.index("FAULT paused") :].splitlines()[0]
                    break
                await asyncio.sleep(0.3)
            if paused is not None:
                await asyncio.sleep(self.rng.uniform(0, 1.5))
            if self._kill(m, f" inside a transaction ({paused})" if paused else " (never paused)"):
                if paused:
                    self.stats.sigkills_in_txn += 1
                else:
                    self.stats.txn_tries_missed += 1
            elif not m.alive():
                assert m.worker is not None and m.worker.proc is not None
                code = m.worker.proc.returncode
                self.stats.exits.append((m.name, code, m.last_words()))
                self.say(f"{m.name} (armed) exited by itself with {code}")
            down = self.rng.uniform(0.5, 3.0)
            if paused and self.rng.random() < self.args.stay_down:
                # A machine that died mid-transaction and takes a while to come back: its
                # transaction stays open until then (or its timeout, 60 s), while the rest
                # of the group goes on (and is killed) around it.
                down = self.rng.uniform(15, 45)
                self.stats.stayed_down += 1
                self.say(f"{m.name} stays down {down:.0f}s with its transaction open")
            m.restart_at = time.monotonic() + down
        finally:
            m.armed = False

    async def chaos(self) -> None:
        args = self.args
        end = self.started + args.seconds
        c = self.members["train-c"]
        next_toggle = self.started + args.seconds * self.rng.uniform(0.1, 0.25)
        while True:
            now = time.monotonic()
            left = end - now
            if left <= 0:
                break
            # Paced to reach --kills with time to spare (a kill inside a transaction takes a while).
            missing = max(1, args.kills - self.stats.total_kills)
            await asyncio.sleep(min(left, self.rng.uniform(0.4, 1.2) * left / (missing + 2)))
            if time.monotonic() >= end - 5:
                break
            if time.monotonic() >= next_toggle:
                if c.desired:
                    c.desired = False
                    self.say("train-c leaves (SIGTERM)")
                    if c.worker is not None:
                        code = await asyncio.to_thread(c.worker.terminate, 60)
                        self.say(f"train-c left with {code}")
                    self.stats.leaves += 1
                else:
                    c.desired = True
                    c.restart_at = time.monotonic()
                    self.stats.joins += 1
                    self.say("train-c joins")
                next_toggle = time.monotonic() + args.seconds * self.rng.uniform(0.08, 0.2)
                continue
            alive = [m for m in self.members.values() if m.alive() and not m.armed and m.desired]
            trainers = [m for m in alive if m.name in ("train-a", "train-b")]
            if trainers and self.rng.random() < args.txn_share:
                await self.kill_in_transaction(self.rng.choice(trainers), end)
            elif alive:
                m = self.rng.choice(alive)
                if self._kill(m):
                    m.restart_at = time.monotonic() + self.rng.uniform(0.5, 3.0)

    async def restart_broker(self) -> None:
        for share in (1 / 3, 2 / 3):
            await asyncio.sleep(max(0, self.started + self.args.seconds * share - time.monotonic()))
            self.say("broker: stopping")
            await asyncio.to_thread(self.broker.stop)
            await asyncio.sleep(self.rng.uniform(3, 6))
            await asyncio.to_thread(self.broker.start, 120)
            self.stats.broker_restarts += 1
            self.say("broker: started again")

    # ── reading back and accounting ─────────────────────────────────────────

    async def read(self, topic: str) -> list[Any]:
        records, _ = await read_committed_topic(self.bootstrap, topic)
        return records

    async def account(self) -> dict[str, Any]:
        results = await self.read(self.topics.generation_results)
        events = await self.read(self.topics.learning_events)
        dead = await self.read(self.topics.dead_letters)
        update_records = await self.read(self.topics.adapter_updates)
        quarantine_records = await self.read(self.topics.quarantine)
        scored: set[tuple[int, int]] = set()
        for r in events:
            try:
                event = decode(r.value, LearningEvent)
            except SchemaError:
                continue
            # Events the scorers wrote name the prefixed topic; the hostile door's do not.
            if event.source.topic == self.topics.generation_results:
                scored.add((event.source.partition, event.source.offset))
        updates = [decode(r.value, AdapterUpdate) for r in update_records]
        quarantined = [decode(r.value, QuarantineRecord) for r in quarantine_records]
        return {
            "results": results,
            "events": events,
            "dead": dead,
            "updates": updates,
            "quarantined": quarantined,
            "acc_results": account_results(positions(results), scored, dead_letter_sources(dead)),
            "acc_events": account_learning_events(positions(events), updates, quarantined, WINDOW),
        }

    async def drain(self) -> tuple[dict[str, Any], float, bool]:
        started = time.monotonic()
        deadline = started + self.args.drain_timeout
        last: tuple[int, int, int] | None = None
        state: dict[str, Any] = {}
        unchanged = 0
        while True:
            try:
                state = await self.account()
            except Exception as exc:
                self.say(f"accounting: {exc!r}")
                await asyncio.sleep(5)
                continue
            shape = (len(state["events"]), len(state["updates"]), len(state["dead"]))
            lost = len(state["acc_results"].lost) + len(state["acc_events"].lost)
            self.say(
                f"drain: {shape[0]} events, {shape[1]} updates, {shape[2]} dead letters, "
                f"{lost} not yet accounted for"
            )
            if lost == 0 and shape == last:
                return state, time.monotonic() - started, True
            unchanged = unchanged + 1 if shape == last else 0
            if time.monotonic() >= deadline or unchanged >= 6:
                if unchanged >= 6:
                    self.say("drain: nothing moved for a minute; what is missing stays missing")
                return state, time.monotonic() - started, False
            last = shape
            await asyncio.sleep(10)

    # ── the whole run ───────────────────────────────────────────────────────

    async def run(self) -> int:
        (self.tmp / "logs").mkdir(parents=True)
        if self.s3 is not None:
            await asyncio.to_thread(self.s3.start)
            self.adapter_dir = f"{self.s3.bucket('soak')}/{self.prefix.rstrip('.')}"
            os.environ.update(self.s3.environment())  # the checks fetch what was announced
        await asyncio.to_thread(self.broker.start, 120)
        await make_topics(self.bootstrap, self.prefix, partitions=PARTITIONS)
        from transformers.utils import logging as hf_logging

        from trainer.model import default_tiny_model_dir

        hf_logging.disable_progress_bar()
        await asyncio.to_thread(default_tiny_model_dir, self.home)  # once, not in a race
        self.member("score-1", ["score"])
        self.member("score-2", ["score"])
        self.member("train-a", ["train"], LORASTREAM_INSTANCE_ID="a")
        self.member("train-b", ["train"], LORASTREAM_INSTANCE_ID="b")
        self.member("train-c", ["train"], LORASTREAM_INSTANCE_ID="c").desired = False
        self.started = time.monotonic()
        tasks = [
            asyncio.create_task(self.supervise()),
            asyncio.create_task(self.follow_versions()),
        ]
        producer = asyncio.create_task(self.produce())
        try:
            await asyncio.gather(self.chaos(), self.restart_broker())
            self.chaos_over.set()
            c = self.members["train-c"]
            if c.desired:
                c.desired = False
                if c.worker is not None:
                    await asyncio.to_thread(c.worker.terminate, 60)
                self.stats.leaves += 1
            await producer
            chaos_seconds = time.monotonic() - self.started
            state, drain_seconds, settled = await self.drain()
        finally:
            for task in tasks:
                task.cancel()
            for m in self.members.values():
                m.desired = False
            for m in self.members.values():
                if m.worker is not None:
                    await asyncio.to_thread(m.worker.terminate, 60)
            if not producer.done():
                producer.cancel()
        # What the members left committed, now that they are stopped.
        state = await self.account()
        await asyncio.to_thread(self.broker.stop)
        checks = await asyncio.to_thread(check_lineages, state, self.home, self.tmp / "retrained")
        if self.s3 is not None:
            self.s3.stop()
        return self.report(state, checks, chaos_seconds, drain_seconds, settled)

    def report(
        self,
        state: dict[str, Any],
        checks: list[tuple[str, list[str]]],
        chaos_seconds: float,
        drain_seconds: float,
        settled: bool,
    ) -> int:
        s = self.stats
        acc_r: Accounting = state["acc_results"]
        acc_e: Accounting = state["acc_events"]
        checks = [
            (
                "1. every input offset accounted for (nothing lost, nothing conflicting)",
                [
                    f"{name}: {len(acc.lost)} lost, {len(acc.conflicting)} conflicting"
                    for name, acc in (("generation-results", acc_r), ("learning-events", acc_e))
                    if acc.lost or acc.conflicting
                ]
                + [f"generation-results lost at {p}" for p in acc_r.lost[:10]]
                + [f"generation-results conflicting at {p}" for p in acc_r.conflicting[:10]]
                + [f"learning-events lost at {p}" for p in acc_e.lost[:10]]
                + [f"learning-events conflicting at {p}" for p in acc_e.conflicting[:10]]
                + ([] if settled else ["the accounting did not settle before the drain timeout"]),
            ),
            *checks,
        ]
        by_adapter: dict[str, list[int]] = defaultdict(list)
        for u in state["updates"]:
            by_adapter[u.adapter].append(u.version)
        print("\n== lorastream soak ==")
        print(
            f"duration: {chaos_seconds:.0f}s of chaos and production, {drain_seconds:.0f}s of "
            f"drain ({'settled' if settled else 'NOT settled'}); seed {self.args.seed}, "
            f"rate {self.args.rate}/s, {PARTITIONS} partitions, broker {self.bootstrap}"
        )
        for door, kinds in (
            ("generation-results", ("valid result", "hostile result")),
            ("learning-events", ("hostile event",)),
        ):
            counts = [f"{k} {v}" for k, v in sorted(s.produced.items()) if k.startswith(kinds)]
            print(f"produced into {door}: " + ", ".join(counts))
        print(
            f"SIGKILLs: {s.total_kills} ("
            + ", ".join(f"{k} {v}" for k, v in sorted(s.sigkills.items()))
            + f"); inside a transaction: {s.sigkills_in_txn}, of which {s.stayed_down} stayed "
            f"down 15-45s (armed trainers that never paused: {s.txn_tries_missed})"
        )
        exits = Counter(f"{name} rc={code}" for name, code, _ in s.exits)
        print(
            f"member exits by themselves: {len(s.exits)}"
            + (f" ({', '.join(f'{k} x{v}' for k, v in sorted(exits.items()))})" if exits else "")
        )
        print(f"trainer c: joined {s.joins} times, left {s.leaves} times (SIGTERM)")
        print(f"broker restarts: {s.broker_restarts}")
        if _code_digest() != self.code:
            print(
                "WARNING: the code of schemas/, streams/, trainer/ or lorastream/ changed on disk "
                "during the run: members restarted after the change ran the new code"
            )
        starts = ", ".join(f"{m.name} {m.starts}" for m in self.members.values())
        print(f"process starts: {starts}")
        for name, acc in (("generation-results", acc_r), ("learning-events", acc_e)):
            outcomes = ", ".join(f"{k} {v}" for k, v in acc.outcomes.most_common())
            reasons = ", ".join(f"{k} {v}" for k, v in acc.reasons.most_common(8))
            print(f"outcomes, {name}: {outcomes}; refused fields: {reasons}")
        dead_from = dead_letter_sources(state["dead"])
        bad_from = {(q.source.partition, q.source.offset) for q in state["quarantined"] if q.source}
        windows_quarantined = [q for q in state["quarantined"] if q.window is not None]
        print(
            f"dead letters: {len(state['dead'])} records for {len(dead_from)} inputs; quarantine: "
            f"{len(state['quarantined']) - len(windows_quarantined)} records for "
            f"{len(bad_from)} unreadable inputs, {len(windows_quarantined)} windows"
        )
        versions = ", ".join(
            f"{a} {len(v)}" + ("" if len(v) == len(set(v)) else " (repeats!)")
            for a, v in sorted(by_adapter.items())
        )
        print(f"versions per adapter ({len(state['updates'])} in all): {versions}")
        failed = False
        for title, problems in checks:
            verdict = "PASS" if not problems else "FAIL"
            failed = failed or bool(problems)
            print(f"{verdict}  {title}")
            for problem in problems[:15]:
                print(f"      {problem}")
            if len(problems) > 15:
                print(f"      … and {len(problems) - 15} more")
        if s.exits:
            print("exits (last lines of each member's output):")
            for name, code, tail in s.exits[:8]:
                last = tail.splitlines()[-1] if tail else ""
                print(f"      {name} rc={code}: {last[:200]}")
        if failed or self.args.keep:
            (self.tmp / "soak-events.log").write_text("\n".join(s.log) + "\n")
            print(f"logs kept in {self.tmp} (logs/, soak-events.log, adapters/)")
        print("RESULT:", "FAIL" if failed else "PASS")
        return 1 if failed else 0


# ── the checks on the lineages ──────────────────────────────────────────────


def check_retrained(
    records: list[Any], updates: list[AdapterUpdate], home: Path, out: Path
) -> list[str]:
    """Each lineage retrained here, uninterrupted, from its announced windows: the same
    sha256 for every version (and every announcement of it)."""
    import torch

    from trainer.lora import LoraSettings, LoraStepper
    from trainer.model import default_tiny_model_dir, load_base_model
    from trainer.store import AdapterStore

    torch.set_num_threads(1)
    found: dict[tuple[str, str], list[tuple[int, int, str, str]]] = defaultdict(list)
    for p, events in events_by_partition(records).items():
        for offset, e in events:
            found[e.adapter, e.id].append((p, offset, e.prompt, e.response))
    base = load_base_model(default_tiny_model_dir(home), torch.device("cpu"))
    stepper = LoraStepper(base, LoraSettings(), seed=0)
    store = AdapterStore(out)
    problems = []
    for adapter, lineage in sorted(lineages_of(updates).items()):
        state = stepper.initial_state()
        digests: dict[int, str] = {}
        for u in first_of_each_version(lineage):
            examples = []
            w = u.window
            for event_id in w.event_ids:
                candidates = found.get((adapter, event_id), [])
                inside = [
                    c
                    for c in candidates
                    if c[0] == w.partition and w.first_offset <= c[1] <= w.last_offset
                ]
                chosen = (inside or candidates or [None])[0]
                if chosen is None:
                    problems.append(f"{adapter} v{u.version}: event {event_id} is not in the log")
                    break
                examples.append((chosen[2], chosen[3]))
            else:
                state = stepper.step(state, examples).state
                digests[u.version] = store.write(adapter, u.version, state, stepper, {}).sha256
                continue
            break
        for u in lineage:
            want = digests.get(u.version)
            if want is not None and want != u.sha256:
                problems.append(
                    f"{adapter} v{u.version}: announced sha256 {u.sha256[:16]}…, the "
                    f"uninterrupted lineage gives {want[:16]}…"
                )
    return problems


def check_lineages(state: dict[str, Any], home: Path, out: Path) -> list[tuple[str, list[str]]]:
    updates: list[AdapterUpdate] = state["updates"]
    topic = state["events"][0].topic if state["events"] else ""
    return [
        ("2. versions 1..n per adapter, no repeat, no gap, parents right", check_versions(updates)),
        ("3. no event id trained twice in one lineage", check_trained_once(updates)),
        (
            "4. every adapter_model.safetensors matches its sha256",
            check_files(updates, out.parent / "checked"),
        ),
        (
            "5a. each adapter's windows are those the live rule gives",
            check_windows(state["events"], updates, state["quarantined"], topic),
        ),
        (
            "5b. each lineage is bit for bit the uninterrupted one (retrained on the CPU)",
            check_retrained(state["events"], updates, home, out),
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=600, help="chaos and production")
    parser.add_argument("--rate", type=float, default=20, help="valid results a second")
    parser.add_argument("--kills", type=int, default=100, help="SIGKILLs at least, in all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hostile", type=float, default=0.1, help="hostile records per valid one, per door"
    )
    parser.add_argument(
        "--txn-share", type=float, default=0.3, help="share of kills aimed inside a transaction"
    )
    parser.add_argument(
        "--stay-down",
        type=float,
        default=0.5,
        help="share of trainers killed inside a transaction that stay down 15-45 s",
    )
    parser.add_argument("--arm-timeout", type=float, default=60)
    parser.add_argument("--drain-timeout", type=float, default=None)
    parser.add_argument("--s3", action="store_true", help="adapters in a bucket of S3Proxy")
    parser.add_argument("--keep", action="store_true", help="keep the logs even on success")
    parser.add_argument("--verbose", "-v", action="store_true", help="print each chaos action")
    args = parser.parse_args()
    if args.drain_timeout is None:
        args.drain_timeout = max(240.0, args.seconds / 2)
    # The clients here log every refused connection while the broker restarts; the report
    # says what matters.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    tmp = Path(tempfile.mkdtemp(prefix="lorastream-soak-"))
    soak = Soak(args, tmp)
    try:
        code = asyncio.run(soak.run())
    finally:
        with contextlib.suppress(Exception):
            soak.broker.stop()
        if soak.s3 is not None:
            soak.s3.stop()
    if code == 0 and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.exit(main())
