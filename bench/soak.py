"""Soak: the whole pipeline for minutes under SIGKILLs and broker restarts, then every record
accounted for and every lineage retrained bit for bit.

Starts its own local broker (free ports, a temporary home, the shared jar cache), because it
restarts it. Topics of 6 partitions. A steady producer writes valid GenerationResults for 12
adapters (most qualifying, ids unique) with hostile records of ``lorastream.dev.hostile``
mixed in, and a stream of hostile records straight into ``learning-events``. Two scorers and two
trainers (``a``, ``b``) run as real processes on one shared home and adapter directory. A
chaos loop SIGKILLs random members (each restarted after a short random delay), some of them
inside a trainer's transaction, between the send and the commit (the trainer is restarted
with ``LORASTREAM_FAULTS=pause:commit-inside:...`` and killed once it says it paused; half
of those stay down 15-45 s, as a machine that died mid-transaction would, while the rest of
the group goes on); a third trainer ``c`` joins and leaves (SIGTERM); the broker is
restarted at 1/3 and 2/3 of the run; members that exit by themselves are restarted and
counted. Every member signs and checks announcements with a random
``LORASTREAM_ANNOUNCE_KEY`` of the run's own.

Two faults, once each:

A. At 40% of the run, a corrupted file: every trainer is SIGKILLed, one byte of
   ``optimizer.safetensors`` of an adapter's newest announced version is flipped (with
   ``--s3``, in the bucket and in every member's cache), and the trainers start again. The
   trainer that takes that adapter must put it on hold (its log says so; ``status --json``
   shows the hold) while the other adapters go on; then the soak runs ``lorastream adapters
   repair NAME`` as an operator would, and the hold must lift and the adapter reach newer
   versions.
B. At half the run, a forged announcement: a plain producer (no transaction, no signature)
   writes an AdapterUpdate for an adapter with version = its newest + 50 and a ``uri`` at a
   copy of another adapter's files outside the adapter directory (or the bucket's prefix).
   No reader may trust it: the trainers go on with that adapter's next versions, ``status``
   and ``adapters list`` still exit 0 and do not show it, and the soak's own reading of
   ``adapter-updates`` skips it with the product's verifier
   (``lorastream.stages.announcement_verifier``), with its position and reason.

Then the chaos and the producer stop, the survivors drain until the accounting settles, and
the soak checks: every input offset in exactly one outcome (``lorastream.dev.hostile``'s
accountants); versions 1..n per adapter with the right parents; no event trained twice in a
lineage; every file's sha256 as announced (the weights against the announcement, and every
file against the version's manifest, itself against ``manifest_sha256``: the repaired
version is the announced one); each adapter's windows those the live rule gives; each
lineage bit for bit that of an uninterrupted run, retrained in this process on the CPU;
and each fault's steps, as above (the report says when each happened, and a missing step
is a failure; so is the forged record not skipped, or any record the trainers committed
skipped). It prints a report and exits 1 on any failure (the logs are kept then).

    .venv/bin/python bench/soak.py [--seconds 600] [--rate 20] [--kills 100] [--seed 0]
                                   [--txn-share 0.3] [--stay-down 0.5] [--s3] [--keep] [-v]
                                   [--adapters-per-step N]

With ``--adapters-per-step N`` the trainers step the windows that close in one batch
together (``LORASTREAM_ADAPTERS_PER_STEP``), and the retraining steps each such window in
its recorded group's shape (``trainer.grouped.stand_in``).

With ``--s3`` the adapters live in a bucket of a real S3Proxy (``lorastream.dev.s3proxy``,
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
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from lorastream.dev.broker import LocalBroker
from lorastream.dev.events import PAIRS
from lorastream.dev.hostile import (
    Accounting,
    Hostile,
    account_learning_events,
    account_results,
    dead_letter_sources,
    hostile_records,
    positions,
)
from lorastream.dev.lineage_checks import (
    check_files,
    check_trained_once,
    check_versions,
    check_windows,
    events_by_partition,
    first_of_each_version,
    lineages_of,
)
from lorastream.dev.ports import free_port
from lorastream.dev.process import run_group
from lorastream.dev.topics import make_topics
from lorastream.dev.workers import LORASTREAM, Worker, worker_env
from lorastream.ops.follow import follow
from lorastream.settings import Settings, default_home, load_settings
from lorastream.stages import announcement_verifier
from schemas import (
    AdapterUpdate,
    LearningEvent,
    QuarantineRecord,
    SchemaError,
    Topics,
    decode,
    encode,
)
from trainer.committed import read_committed_topic
from trainer.kafka import KafkaConnection
from trainer.lineage import read_announcement
from trainer.signing import Verifier

ADAPTERS = [f"soak-{n:02d}" for n in range(12)]
TRAINERS = ("train-a", "train-b", "train-c")
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


@dataclass
class Ran:
    """One ``lorastream`` command the soak ran, as an operator would."""

    command: str
    at: float  # seconds into the run
    returncode: int | None
    seconds: float
    output: str  # stderr, then stdout
    stdout: str

    def last_line(self) -> str:
        lines = [_ANSI.sub("", line).strip() for line in self.output.splitlines()]
        lines = [line for line in lines if line]
        return (lines or [""])[-1][:300]

    def __str__(self) -> str:
        code = "timed out" if self.returncode is None else f"rc {self.returncode}"
        return f"`{self.command}` at {self.at:.1f}s: {code} in {self.seconds:.1f}s"


@dataclass
class Corruption:
    """Fault A: one byte of one file of an adapter's newest announced version flipped,
    then the hold, the repair, and the adapter going on."""

    adapter: str | None = None
    version: int | None = None
    file: str = "optimizer.safetensors"
    at: float | None = None
    where: list[str] = field(default_factory=list)  # each copy flipped, with the byte
    held_at: float | None = None
    held_by: str | None = None
    held_line: str = ""
    status_held: Ran | None = None  # `lorastream status --json` while held
    status_hold: str | None = None
    repairs: list[Ran] = field(default_factory=list)
    repaired_at: float | None = None
    lifted_at: float | None = None
    lifted_how: str = ""
    next_version: tuple[float, int] | None = None  # when the follower saw it
    status_after: Ran | None = None
    status_after_hold: str | None = None
    others_meanwhile: int = 0  # versions of other adapters announced while it was held
    newest_at_end: int | None = None
    set_aside: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Forgery:
    """Fault B: an unsigned announcement from a plain producer, of a version far ahead,
    whose ``uri`` is a copy of another adapter's files outside the adapter location."""

    adapter: str | None = None
    version: int | None = None
    newest_then: int | None = None
    copied_from: str = ""
    uri: str = ""
    at: float | None = None
    position: tuple[int, int] | None = None  # partition, offset on adapter-updates
    mid_run: list[Ran] = field(default_factory=list)  # status and adapters list, soon after
    final: list[Ran] = field(default_factory=list)  # the same, after the drain
    listed_forged: bool = False  # `adapters list --json` showed the forged version
    status_version: int | None = None  # the adapter's version in the final `status --json`
    newest_at_end: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Skipped:
    """A record of adapter-updates that the product's verifier does not trust."""

    partition: int
    offset: int
    reason: str
    detail: str


def _flip_byte(data: bytes) -> tuple[bytes, int]:
    """``data`` with one byte of its tensor data inverted (past a safetensors header)."""
    start = 0
    if len(data) > 8:
        header = int.from_bytes(data[:8], "little")
        if 8 + header < len(data):
            start = 8 + header
    position = start + (len(data) - start) // 2
    flipped = bytearray(data)
    flipped[position] ^= 0xFF
    return bytes(flipped), position


def _flip_file(path: Path) -> str:
    """Invert one byte of ``path`` in place; what was done, for the report."""
    data = path.read_bytes()
    flipped, at = _flip_byte(data)
    with path.open("r+b") as handle:
        handle.seek(at)
        handle.write(flipped[at : at + 1])
        handle.flush()
        os.fsync(handle.fileno())
    return f"{path} (byte {at} of {len(data)}: 0x{data[at]:02x} -> 0x{flipped[at]:02x})"


def _flip_object(uri: str, name: str) -> str:
    """Invert one byte of the object ``uri/name`` (read, changed, put back)."""
    import obstore
    from obstore.store import from_url

    store = from_url(uri)
    data = bytes(obstore.get(store, name).bytes())
    flipped, at = _flip_byte(data)
    obstore.put(store, name, flipped)
    return f"{uri}/{name} in the bucket (byte {at} of {len(data)})"


def _copy_objects(source: str, target: str) -> None:
    """Copy the version at ``source`` (every file its manifest lists, and the manifest)."""
    import obstore
    from obstore.store import from_url

    from trainer.manifest import MANIFEST_FILE, parse

    src, dst = from_url(source), from_url(target)
    document = bytes(obstore.get(src, MANIFEST_FILE).bytes())
    for name in parse(document, source):
        obstore.put(dst, name, bytes(obstore.get(src, name).bytes()))
    obstore.put(dst, MANIFEST_FILE, document)


def _hold_in(ran: Ran | None, adapter: str) -> str | None:
    """The ``hold`` that ``lorastream status --json`` gave ``adapter``."""
    if ran is None or ran.returncode != 0:
        return None
    with contextlib.suppress(orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
        for entry in orjson.loads(ran.stdout)["adapters"]:
            if entry.get("adapter") == adapter:
                hold = entry.get("hold")
                return None if hold is None else str(hold)
    return None


def _why_skipped(verifier: Verifier, record: Any, reason: str) -> str:
    """What the verifier found wrong with a record it skipped, in its own words."""
    if reason in ("unsigned", "signature"):
        problem = verifier.signature_problem(record)
        return problem[1] if problem else ""
    if reason == "location":
        with contextlib.suppress(SchemaError):
            problem = verifier.location_problem(decode(record.value, AdapterUpdate).uri)
            return problem[1] if problem else ""
    return "not an announcement" if record.value is not None else "a tombstone"


# ── the soak ────────────────────────────────────────────────────────────────


class Soak:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.rng = random.Random(args.seed)
        self.broker = LocalBroker(
            tmp / "kafka",
            port=free_port(),
            controller_port=free_port(),
            jars_dir=default_home() / "jars",
        )
        self.bootstrap = self.broker.bootstrap
        self.prefix = f"soak{uuid.uuid4().hex[:6]}."
        self.topics = Topics.named(self.prefix)
        self.home = tmp / "home"
        self.adapter_dir: str = str(tmp / "adapters")
        self.s3: Any = None
        if args.s3:
            from lorastream.dev.s3proxy import LocalS3

            self.s3 = LocalS3(tmp / "s3", jars=default_home() / "s3proxy")
        self.stats = Stats()
        self.versions: dict[str, int] = {}
        self.newest: dict[str, AdapterUpdate] = {}
        # (seconds into the run, adapter, version) of each announcement, as the follower saw it
        self.timeline: list[tuple[float, str, int]] = []
        self.started = time.monotonic()
        self.chaos_over = asyncio.Event()
        # Held by each chaos action and by the faults while they kill and corrupt.
        self.chaos_lock = asyncio.Lock()
        self.members: dict[str, Member] = {}
        self.code = _code_digest()
        # Every member signs and checks announcements with this run's key.
        self.announce_key = secrets.token_hex(32)
        self.fault_rng = random.Random(args.seed + 5)
        self.corruption = Corruption()
        self.forgery = Forgery()
        self.skipped: list[Skipped] = []

    def now(self) -> float:
        return time.monotonic() - self.started

    def settings(self) -> Settings:
        """This run's settings as a member's environment gives them."""
        return load_settings(
            bootstrap_servers=self.bootstrap,
            topic_prefix=self.prefix,
            adapter_dir=self.adapter_dir,
            home=self.home,
            announce_key=self.announce_key,
        )

    def verifier(self, on_reject: Callable[[str], None] | None = None) -> Verifier:
        """What the product's readers trust (lorastream.stages.announcement_verifier)."""
        return announcement_verifier(self.settings(), on_reject)

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {text}"
        self.stats.log.append(line)
        if self.args.verbose:
            print(line, flush=True)

    def env(self, name: str, **more: str) -> dict[str, str]:
        """The environment of member (or command) ``name``."""
        if self.s3 is not None:  # a cache of its own, as on a machine of its own
            more = {
                **self.s3.environment(),
                "LORASTREAM_ADAPTER_CACHE": str(self.tmp / "caches" / name),
                **more,
            }
        return worker_env(
            self.bootstrap,
            self.prefix,
            self.home,
            LORASTREAM_ADAPTER_DIR=self.adapter_dir,
            LORASTREAM_ANNOUNCE_KEY=self.announce_key,
            LORASTREAM_DEVICE="cpu",
            LORASTREAM_ADAPTERS_PER_STEP=str(self.args.adapters_per_step),
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            **more,
        )

    def member(self, name: str, args: list[str], **more: str) -> Member:
        m = Member(name, args, self.env(name, **more), self.tmp / "logs" / f"{name}.log")
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
            if update.version > self.versions.get(update.adapter, 0):
                self.versions[update.adapter] = update.version
                self.newest[update.adapter] = update
                self.timeline.append((self.now(), update.adapter, update.version))

        while True:
            try:
                # The product's follower and verifier: a forged announcement is not a version.
                await follow(
                    KafkaConnection(self.bootstrap),
                    self.topics.adapter_updates,
                    seen,
                    from_beginning=True,
                    verifier=self.verifier(),
                )
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
            async with self.chaos_lock:  # not while a fault kills and corrupts
                next_toggle = await self._chaos_action(end, next_toggle)

    async def _chaos_action(self, end: float, next_toggle: float) -> float:
        """One action: trainer c joins or leaves, or a member is SIGKILLed (a trainer perhaps
        inside its transaction); returns the time of the next join or leave."""
        args = self.args
        c = self.members["train-c"]
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
            return time.monotonic() + args.seconds * self.rng.uniform(0.08, 0.2)
        alive = [m for m in self.members.values() if m.alive() and not m.armed and m.desired]
        trainers = [m for m in alive if m.name in ("train-a", "train-b")]
        if trainers and self.rng.random() < args.txn_share:
            await self.kill_in_transaction(self.rng.choice(trainers), end)
        elif alive:
            m = self.rng.choice(alive)
            if self._kill(m):
                m.restart_at = time.monotonic() + self.rng.uniform(0.5, 3.0)
        return next_toggle

    async def restart_broker(self) -> None:
        for share in (1 / 3, 2 / 3):
            await asyncio.sleep(max(0, self.started + self.args.seconds * share - time.monotonic()))
            self.say("broker: stopping")
            await asyncio.to_thread(self.broker.stop)
            await asyncio.sleep(self.rng.uniform(3, 6))
            await asyncio.to_thread(self.broker.start, 120)
            self.stats.broker_restarts += 1
            self.say("broker: started again")

    # ── fault A: one corrupted file ─────────────────────────────────────────

    def _trainer_logs(self) -> dict[str, int]:
        """Where each trainer's log ends now."""
        return {
            name: (m.log.stat().st_size if m.log.exists() else 0)
            for name, m in self.members.items()
            if name in TRAINERS
        }

    def _said(self, since: dict[str, int], text: str) -> tuple[str, str] | None:
        """The first trainer (and its line) that logged ``text`` after ``since``."""
        for name, mark in sorted(since.items()):
            try:
                with self.members[name].log.open("rb") as handle:
                    handle.seek(mark)
                    out = handle.read().decode(errors="replace")
            except OSError:
                continue
            for line in out.splitlines():
                if text in line:
                    return name, _ANSI.sub("", line).strip()[:400]
        return None

    async def _flip(self, adapter: str, version: int) -> list[str]:
        """Flip one byte of the file in every copy of ``adapter`` v``version``: the
        directory, or the bucket and every member's cache (which would else be trusted)."""
        name = self.corruption.file
        if self.s3 is None:
            path = Path(self.adapter_dir) / adapter / f"v{version}" / name
            return [await asyncio.to_thread(_flip_file, path)]
        from trainer.objects import local_path_of

        uri = f"{self.adapter_dir}/{adapter}/v{version}"
        where = [await asyncio.to_thread(_flip_object, uri, name)]
        for cache in sorted((self.tmp / "caches").glob("*")):
            path = local_path_of(uri, cache) / name
            if path.is_file():
                where.append(await asyncio.to_thread(_flip_file, path))
        return where

    async def corrupt(self) -> None:
        """Fault A, at 40% of the run: every trainer SIGKILLed (so none keeps the version in
        memory), one byte of ``optimizer.safetensors`` of an adapter's newest announced
        version flipped, the trainers started again. The one that takes the adapter must
        hold it (its log says so), the others go on; then ``lorastream adapters repair`` as
        an operator runs it, and the hold must lift and the adapter go past that version."""
        f = self.corruption
        try:
            await asyncio.sleep(max(0, self.started + self.args.seconds * 0.4 - time.monotonic()))
            async with self.chaos_lock:
                since = await self._corrupt_now()
            if since is None:
                return
            await self._see_it_held(since)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            f.notes.append(f"fault A stopped by {exc!r}")
            self.say(f"fault A: {exc!r}")

    async def _corrupt_now(self) -> dict[str, int] | None:
        f = self.corruption
        trainers = [self.members[name] for name in TRAINERS]
        for m in trainers:
            m.armed = True  # the supervisor leaves them down until the file is flipped
        try:
            for m in trainers:
                self._kill(m, " (fault A: every trainer, before a file is corrupted)")
            await asyncio.sleep(3)  # what they committed last reaches the follower
            candidates = sorted(a for a, v in self.versions.items() if v >= 1)
            if not candidates:
                f.notes.append("no adapter had an announced version at 40% of the run")
                return None
            adapter = self.fault_rng.choice(candidates)
            f.adapter = adapter
            for _ in range(3):
                version = self.versions[adapter]
                f.version, f.at = version, self.now()
                where = await self._flip(adapter, version)
                f.where += where
                self.say(f"fault A: flipped a byte of {adapter} v{version} {f.file}: {where}")
                await asyncio.sleep(2)
                if self.versions[adapter] == version:
                    break
                f.notes.append(
                    f"v{self.versions[adapter]} of {adapter} was committed just before the "
                    "kill; its file is flipped too"
                )
            return self._trainer_logs()
        finally:
            for m in trainers:
                m.armed = False
                if m.desired and not m.alive():
                    m.restart_at = time.monotonic() + self.rng.uniform(0.5, 2.0)

    async def _see_it_held(self, since: dict[str, int]) -> None:
        f = self.corruption
        assert f.adapter is not None and f.version is not None
        adapter, version = f.adapter, f.version
        status = asyncio.create_task(self.until_it_answers("status-held"))
        while True:
            found = self._said(since, f"{adapter} is on hold")
            if found is not None:
                f.held_at, (f.held_by, f.held_line) = self.now(), found
                self.say(f"fault A: {adapter} held by {f.held_by}")
                break
            if self.versions.get(adapter, 0) > version:
                f.notes.append(
                    f"{adapter} reached v{self.versions[adapter]} with no hold: the corrupted "
                    f"v{version} was used or skipped unchecked"
                )
                return
            await asyncio.sleep(1)
        f.status_held = await status
        f.status_hold = _hold_in(f.status_held, adapter)
        for _ in range(3):
            before = self._trainer_logs()
            ran = await self.command("repair", "adapters", "repair", adapter, timeout=600)
            f.repairs.append(ran)
            if ran.returncode == 0 and "restored" in ran.output:
                f.repaired_at = self.now()
                break
            await asyncio.sleep(10)  # the broker restarting, say: the operator tries again
        else:
            return
        while True:
            lifted = self._said(before, f"{adapter}: its files and settings check out again")
            if lifted is not None:
                f.lifted_at = self.now()
                f.lifted_how = f"{lifted[0]}: {lifted[1]}"
                break
            if self.versions.get(adapter, 0) > version:
                f.lifted_at = self.now()
                f.lifted_how = (
                    "no trainer logged it (one started since the repair took the adapter)"
                )
                break
            await asyncio.sleep(1)
        self.say(f"fault A: the hold on {adapter} is lifted ({f.lifted_how})")
        while self.versions.get(adapter, 0) <= version and not self.chaos_over.is_set():
            await asyncio.sleep(1)
        f.next_version = next(
            ((t, v) for t, a, v in self.timeline if a == adapter and v > version), None
        )
        f.others_meanwhile = sum(
            1 for t, a, _ in self.timeline if a != adapter and f.held_at <= t <= f.lifted_at
        )
        f.status_after = await self.until_it_answers("status-after")
        f.status_after_hold = _hold_in(f.status_after, adapter)

    # ── fault B: a forged announcement ──────────────────────────────────────

    async def forge(self) -> None:
        """Fault B, at half the run: a plain producer (no transaction, no signature) writes
        an AdapterUpdate for an adapter with version = its newest + 50, whose ``uri`` is a
        copy of another adapter's newest version outside the adapter location."""
        f = self.forgery
        try:
            await asyncio.sleep(max(0, self.started + self.args.seconds * 0.5 - time.monotonic()))
            candidates = sorted(
                a
                for a, v in self.versions.items()
                if v >= 1 and a != self.corruption.adapter and a in self.newest
            )
            if len(candidates) < 2:
                f.notes.append("fewer than two adapters had a version at half the run")
                return
            target, source = self.fault_rng.sample(candidates, 2)
            copied = self.newest[source]
            f.adapter, f.newest_then = target, self.versions[target]
            f.version = f.newest_then + 50
            f.copied_from = f"{source} v{copied.version}"
            if self.s3 is None:
                where = self.tmp / "forged" / target / f"v{f.version}"
                await asyncio.to_thread(shutil.copytree, copied.uri, where)
                f.uri = str(where)
            else:  # the same bucket, outside the prefix
                bucket = self.adapter_dir.split("/")[2]
                f.uri = f"s3://{bucket}/forged-{uuid.uuid4().hex[:6]}/{target}/v{f.version}"
                await asyncio.to_thread(_copy_objects, copied.uri, f.uri)
            forged = copied.model_copy(
                update={
                    "adapter": target,
                    "version": f.version,
                    "parent_version": f.version - 1,
                    "uri": f.uri,
                    "created_at": datetime.now(UTC),
                }
            )
            f.position = await self._send_plain(target, encode(forged))
            f.at = self.now()
            self.say(
                f"fault B: forged {target} v{f.version} (uri {f.uri}) at "
                f"adapter-updates[{f.position[0]}]@{f.position[1]}"
            )
            await asyncio.sleep(10)
            f.mid_run.append(await self.until_it_answers("status-forged"))
            f.mid_run.append(
                await self.until_it_answers(
                    "list-forged", "adapters", "list", "--adapter", target, "--json"
                )
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            f.notes.append(f"fault B stopped by {exc!r}")
            self.say(f"fault B: {exc!r}")

    async def _send_plain(self, key: str, value: bytes) -> tuple[int, int]:
        """One record on adapter-updates from a plain producer (retried while the broker
        restarts); its partition and offset."""
        deadline = time.monotonic() + 180
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap, acks="all", request_timeout_ms=30_000
            )
            try:
                await producer.start()
                meta = await producer.send_and_wait(
                    self.topics.adapter_updates, key=key.encode(), value=value
                )
                return meta.partition, meta.offset
            except KafkaError as exc:
                if time.monotonic() >= deadline:
                    raise
                self.say(f"fault B: {exc!r}; trying again")
                await asyncio.sleep(3)
            finally:
                await producer.stop()

    async def final_commands(self, state: dict[str, Any]) -> None:
        """After the drain: ``status`` and ``adapters list`` must still work, and show no
        forged version; each fault's adapter's newest version at the end."""
        newest: dict[str, int] = {}
        for u in state["updates"]:
            newest[u.adapter] = max(newest.get(u.adapter, 0), u.version)
        a, b = self.corruption, self.forgery
        if a.adapter is not None:
            a.newest_at_end = newest.get(a.adapter)
            if self.s3 is None:
                root = Path(self.adapter_dir) / a.adapter
                a.set_aside = sorted(p.name for p in root.glob(f".v{a.version}.corrupt-*"))
        if b.adapter is None:
            return
        b.newest_at_end = newest.get(b.adapter)
        status = await self.command("status-final", "status", "--json")
        listed = await self.command(
            "list-final", "adapters", "list", "--adapter", b.adapter, "--json"
        )
        b.final = [status, listed]
        for line in listed.stdout.splitlines():
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                doc = orjson.loads(line)
                if doc.get("version") == b.version or doc.get("uri") == b.uri:
                    b.listed_forged = True
        with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
            for entry in orjson.loads(status.stdout)["adapters"]:
                if entry.get("adapter") == b.adapter:
                    b.status_version = entry.get("version")

    async def until_it_answers(self, name: str, *args: str) -> Ran:
        """``lorastream ARGS`` (default ``status --json``), tried again while the broker
        restarts: what an operator would see once it answers."""
        for _ in range(3):
            ran = await self.command(name, *(args or ("status", "--json")))
            if ran.returncode == 0:
                break
            await asyncio.sleep(10)
        return ran

    async def command(self, name: str, *args: str, timeout: float = 300) -> Ran:
        """``lorastream ARGS`` as an operator runs it, with a member's environment (and,
        on S3, a cache of its own); its output also goes to ``logs/<name>.log``."""
        at, began = self.now(), time.monotonic()
        code, out, err = await run_group(
            [LORASTREAM, *args], env={**os.environ, **self.env(name)}, timeout=timeout
        )
        ran = Ran(
            "lorastream " + " ".join(args),
            at,
            code,
            time.monotonic() - began,
            err.decode(errors="replace") + out.decode(errors="replace"),
            out.decode(errors="replace"),
        )
        with (self.tmp / "logs" / f"{name}.log").open("a") as handle:
            handle.write(f"=== {ran}\n{ran.output}\n")
        self.say(f"{ran}: {ran.last_line()}")
        return ran

    # ── reading back and accounting ─────────────────────────────────────────

    async def read(self, topic: str) -> list[Any]:
        records, _ = await read_committed_topic(KafkaConnection(self.bootstrap), topic)
        return records

    def trusted(self, records: list[Any]) -> tuple[list[AdapterUpdate], list[Skipped]]:
        """The announcements the product's readers trust (signed with this run's key, files
        under the adapter location), and the records they skip, with the reason. The version
        order is left to the checks: a repeat or a gap is a finding, not a skip."""
        reasons: list[str] = []
        verifier = self.verifier(reasons.append)
        updates, skipped = [], []
        for record in records:
            heard = len(reasons)
            update = read_announcement(record, verifier)
            if update is not None:
                updates.append(update)
                continue
            reason = reasons[heard] if len(reasons) > heard else "tombstone"
            skipped.append(
                Skipped(
                    record.partition,
                    record.offset,
                    reason,
                    _why_skipped(verifier, record, reason),
                )
            )
        return updates, skipped

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
        updates, self.skipped = self.trusted(update_records)
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

    async def drain(self, busy: Callable[[], bool]) -> tuple[dict[str, Any], float, bool]:
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
            # A held adapter's window waits for the repair: not "nothing moved" meanwhile.
            if time.monotonic() >= deadline or (unchanged >= 6 and not busy()):
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
        faults = [asyncio.create_task(self.corrupt()), asyncio.create_task(self.forge())]
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
            state, drain_seconds, settled = await self.drain(lambda: not faults[0].done())
            # Each fault's last step (a status, say) ends soon after the drain, or not at all.
            await asyncio.wait(faults, timeout=120)
        finally:
            for task in faults:
                if not task.done():
                    task.cancel()
                    self.say("a fault was still under way at the end; cancelled")
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
        await self.final_commands(state)
        await asyncio.to_thread(self.broker.stop)
        checks = await asyncio.to_thread(check_lineages, state, self.home, self.tmp / "retrained")
        if self.s3 is not None:
            self.s3.stop()
        return self.report(state, checks, chaos_seconds, drain_seconds, settled)

    # ── the faults in the report ────────────────────────────────────────────

    def corruption_report(self) -> tuple[list[str], list[str]]:
        """Fault A's lines for the report, and its problems (each missing step is one)."""
        f = self.corruption
        lines: list[str] = []
        problems: list[str] = [f"fault A: {note}" for note in f.notes if "stopped" in note]
        if f.adapter is None or f.version is None or f.at is None:
            return ["not done: " + "; ".join(f.notes)], problems or ["fault A was not done"]
        a, v = f.adapter, f.version
        lines.append(f"corrupted: {a} v{v} {f.file}, one byte flipped at {f.at:.1f}s, in:")
        lines += [f"  {where}" for where in f.where]
        lines += [f"note: {note}" for note in f.notes]
        if f.held_at is None:
            problems.append(f"no trainer put {a} on hold after its v{v} {f.file} was corrupted")
            lines.append("hold: never seen in a trainer's log")
        else:
            lines.append(f"hold first seen at {f.held_at:.1f}s, by {f.held_by}: {f.held_line}")
        if f.status_held is not None:
            lines.append(
                f"{f.status_held}: hold of {a}: "
                + (repr(f.status_hold[:200]) if f.status_hold else "none shown")
            )
        for ran in f.repairs:
            lines.append(f"repair: {ran}: {ran.last_line()}")
        if f.held_at is not None and f.repaired_at is None:
            problems.append(
                f"`lorastream adapters repair {a}` did not restore it"
                + (f": {f.repairs[-1].last_line()}" if f.repairs else " (never run)")
            )
        if f.set_aside:
            lines.append(f"set aside by the repair: {', '.join(f.set_aside)}")
        if f.lifted_at is None:
            if f.repaired_at is not None:
                problems.append(f"the hold on {a} was not lifted after the repair")
        else:
            assert f.held_at is not None
            lines.append(f"hold lifted at {f.lifted_at:.1f}s: {f.lifted_how}")
            if f.next_version is not None:
                t, n = f.next_version
                lines.append(f"{a} v{n}, its first version past the corrupted one, at {t:.1f}s")
            lines.append(
                f"meanwhile ({f.held_at:.0f}s to {f.lifted_at:.0f}s) the other adapters got "
                f"{f.others_meanwhile} new versions"
            )
            if f.others_meanwhile == 0 and f.lifted_at - f.held_at >= 60:
                problems.append(f"no other adapter got a version while {a} was held")
        if f.status_after is not None:
            lines.append(
                f"{f.status_after}: hold of {a}: "
                + (repr(f.status_after_hold[:200]) if f.status_after_hold else "none")
            )
        lines.append(f"{a}'s newest version at the end: v{f.newest_at_end}")
        if f.newest_at_end is None or f.newest_at_end <= v:
            problems.append(f"{a} did not go past the corrupted v{v} (newest v{f.newest_at_end})")
        return lines, problems

    def forgery_report(self) -> tuple[list[str], list[str]]:
        """Fault B's lines for the report, and its problems."""
        f = self.forgery
        problems: list[str] = [f"fault B: {note}" for note in f.notes]
        forged_skip = [
            s
            for s in self.skipped
            if f.position is not None and (s.partition, s.offset) == f.position
        ]
        others = [s for s in self.skipped if s not in forged_skip]
        problems += [
            f"a record the trainers committed was skipped: adapter-updates[{s.partition}]@"
            f"{s.offset}: {s.reason}: {s.detail}"
            for s in others
        ]
        if f.position is None or f.at is None:
            return ["not done: " + "; ".join(f.notes)], problems or ["fault B was not done"]
        where = f"adapter-updates[{f.position[0]}]@{f.position[1]}"
        lines = [
            f"forged at {f.at:.1f}s by a plain producer (no transaction, no signature): "
            f"{f.adapter} v{f.version} (its newest was v{f.newest_then}) at {where}, uri "
            f"{f.uri} (a copy of {f.copied_from}'s files)"
        ]
        if forged_skip:
            s = forged_skip[0]
            lines.append(f"the soak's final reading: {where} skipped: {s.reason}: {s.detail}")
        else:
            lines.append(f"the soak's final reading: {where} TRUSTED")
            problems.append(f"the forged record at {where} was not skipped")
        logged = sorted(
            name
            for name, m in self.members.items()
            if name in TRAINERS
            and m.log.exists()
            and f"[{f.position[0]}]@{f.position[1]}" in m.log.read_text(errors="replace")
        )
        lines.append(
            "trainers that logged skipping it: " + (", ".join(logged) if logged else "none")
        )
        for ran in f.mid_run:
            lines.append(f"soon after: {ran}")
        for ran in f.final:
            lines.append(f"after the drain: {ran}")
            if ran.returncode != 0:
                problems.append(f"{ran} after the forgery: {ran.last_line()}")
        if len(f.final) < 2:
            problems.append("status and adapters list were not run after the drain")
        if f.listed_forged:
            problems.append(f"`adapters list` showed the forged {f.adapter} v{f.version}")
        if f.status_version is not None and f.status_version >= (f.version or 0):
            problems.append(f"`status` gave {f.adapter} version {f.status_version}")
        lines.append(
            f"{f.adapter}: v{f.newest_then} when forged, v{f.newest_at_end} at the end"
            + (f" (status: v{f.status_version})" if f.status_version is not None else "")
        )
        if f.newest_at_end is None or f.newest_then is None or f.newest_at_end <= f.newest_then:
            problems.append(f"{f.adapter} got no version after the forgery")
        return lines, problems

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
        corrupted, corrupted_problems = self.corruption_report()
        forged, forged_problems = self.forgery_report()
        checks += [
            (
                "6. fault A: a corrupted file holds its adapter alone; repaired, it goes on",
                corrupted_problems,
            ),
            (
                "7. fault B: a forged announcement is trusted by no reader, stops none",
                forged_problems,
            ),
        ]
        by_adapter: dict[str, list[int]] = defaultdict(list)
        for u in state["updates"]:
            by_adapter[u.adapter].append(u.version)
        grouped = sum(1 for u in state["updates"] if u.window.group is not None)
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
        print(
            f"announcements of windows stepped with other adapters' (--adapters-per-step "
            f"{self.args.adapters_per_step}): {grouped}"
        )
        print(f"announcements signed with this run's key; records skipped: {len(self.skipped)}")
        for title, lines in (
            ("fault A, a corrupted file", corrupted),
            ("fault B, a forged announcement", forged),
        ):
            print(f"{title}:")
            for line in lines:
                print(f"      {line}")
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

    from trainer.config import LoraSettings
    from trainer.grouped import GroupedStepper, Member, stand_in
    from trainer.lora import LoraStepper, StepResult
    from trainer.model import default_tiny_model_dir, load_base_model
    from trainer.store import AdapterStore

    torch.set_num_threads(1)
    found: dict[tuple[str, str], list[tuple[int, int, str, str]]] = defaultdict(list)
    for p, events in events_by_partition(records).items():
        for offset, e in events:
            found[e.adapter, e.id].append((p, offset, e.prompt, e.response))
    base = load_base_model(default_tiny_model_dir(home), torch.device("cpu"))
    lora = LoraSettings()
    stepper = LoraStepper(base, lora, seed=0)
    grouped = GroupedStepper(stepper)
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
                chosen = inside[0] if inside else candidates[0] if candidates else None
                if chosen is None:
                    problems.append(f"{adapter} v{u.version}: event {event_id} is not in the log")
                    break
                examples.append((chosen[2], chosen[3]))
            else:
                group = w.group
                if group is None:
                    state = stepper.step(state, examples).state
                else:  # stepped with other adapters: in that batch's shape (trainer.grouped)
                    own = group.adapters.index(adapter)
                    members = [
                        Member(state, examples, lora) if k == own else stand_in(rows, lora)
                        for k, rows in enumerate(group.rows)
                    ]
                    result = grouped.step(members)[own]
                    assert isinstance(result, StepResult), result
                    state = result.state
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


def check_manifests(updates: list[AdapterUpdate], cache: Path) -> list[str]:
    """Every file of every version as its manifest says, and the manifest as announced
    (``manifest_sha256``): what proves that a repaired version is the announced one. A
    version on an object store is fetched into ``cache`` first."""
    from trainer import manifest
    from trainer.exceptions import TrainerError
    from trainer.objects import fetch_version, is_remote

    problems = []
    seen: set[tuple[str, str | None]] = set()
    for u in updates:
        if (u.uri, u.manifest_sha256) in seen:
            continue
        seen.add((u.uri, u.manifest_sha256))
        if u.manifest_sha256 is None:
            problems.append(f"{u.adapter} v{u.version}: announced without a manifest_sha256")
            continue
        try:
            where = fetch_version(u.uri, cache) if is_remote(u.uri) else Path(u.uri)
            manifest.verify(where, f"{u.adapter} v{u.version}", u.manifest_sha256, u.sha256)
        except TrainerError as exc:
            problems.append(str(exc))
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
            "4b. every file of every version as its manifest says, the manifest as announced",
            check_manifests(updates, out.parent / "checked"),
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
    parser.add_argument(
        "--adapters-per-step",
        type=int,
        default=1,
        help="LORASTREAM_ADAPTERS_PER_STEP of the trainers: windows closed together step together",
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs even on success")
    parser.add_argument("--verbose", "-v", action="store_true", help="print each chaos action")
    args = parser.parse_args()
    if args.drain_timeout is None:
        args.drain_timeout = max(240.0, args.seconds / 2)
    # The clients here log every refused connection while the broker restarts; the report
    # says what matters.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    # Each reading of adapter-updates logs the forged record again; the report lists it.
    logging.getLogger("trainer.signing").setLevel(logging.ERROR)
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
