"""``lorastream demo``: the whole pipeline on a real Kafka broker, explained as it runs.

A first run should teach the product. Each stage says what it does while it
does it: the broker (the local one is started if none answers, and stopped at
the end only then), fresh topics under a ``demo-<id>.`` prefix, a generated
data set with bad lines and bad records on purpose, the scorer and the trainer
as real worker processes, the announcements followed until every window is a
version, the dead letters read back with the reason in their headers, a
picture of the loss of every version, and the newest adapters loaded from
their announcements as a serving system would, with a greedy generation.

The data (:data:`TASKS`) and the training settings (:data:`TRAINING`) are the
demo's own. The built-in model is a random two-layer Llama over bytes: its
loss starts at chance, ln 384, and with these settings it learns each
adapter's responses by heart in a few dozen one-step windows, so that the
picture and the generation show learning rather than noise.

Clean-up runs on success, failure, Ctrl-C and SIGTERM alike: the workers are
stopped and, unless ``--keep``, the run's topics are deleted and its
temporary directory (data, logs, adapters) removed. Only the picture stays.

Nothing heavy is imported at module level: the first line must appear at once,
and torch, transformers and matplotlib are loaded only for the steps that use
them.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from rich.console import Console
from rich.markup import escape

from lorastream.settings import Settings
from schemas import AdapterUpdate
from schemas.errors import LorastreamError

if TYPE_CHECKING:
    from aiokafka.structs import ConsumerRecord
    from rich.progress import Progress, TaskID

__all__ = ["TASKS", "TRAINING", "DemoError", "DemoTraining", "demo_records", "run_demo"]

TASKS: dict[str, list[tuple[str, str]]] = {
    "math-tutor": [
        ("What is 7 times 8?", "7 times 8 is 56."),
        ("What is 12 plus 30?", "12 plus 30 is 42."),
    ],
    "support-bot": [
        ("My order is late.", "Sorry! It ships today."),
        ("Can I get a refund?", "Yes, within 30 days."),
    ],
}

# Lines that `produce` refuses, by line number, and records sent past it for the scorer.
BAD_LINES = {
    11: b'{"id": "bad-1", "prompt": "no response field", "entropy_delta": -0.5}',
    41: b'{"id": "bad-2", "adapter": "../etc/passwd", "prompt": "p", "response": "r", "entropy_delta": 1}',
    71: b"this line is not JSON",
}
BAD_RECORDS = [
    (
        b"../etc/passwd",
        b'{"id": "raw-1", "adapter": "../etc/passwd", "prompt": "p", "response": "r", "entropy_delta": 1}',
    ),
    (
        b"support-bot",
        b'{"id": "raw-2", "adapter": "support-bot", "prompt": "Hi", "response": "Hello!", '
        b'"baselin": "Hello!", "entropy_delta": -0.3}',
    ),
]

VOCABULARY = 384  # the built-in model's byte-level vocabulary: 256 bytes, 3 specials, 125 extra ids
CHANCE = math.log(VOCABULARY)
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # Faust's worker hides and shows the cursor


@dataclass(frozen=True)
class DemoTraining:
    """The demo's training settings, given to the trainer through its variables.

    Found by training the pairs of :data:`TASKS` directly with ``trainer.lora``, in
    the demo's windows: with these the loss on the pairs falls below 2 within 14
    steps and near 0.1 by 40, and greedy generation gives back every trained
    response; the neighbours (learning rate 2e-3 to 3e-3, 32 to 48 versions) do too.
    ``lm_head`` is the one that matters: the tiny model's output layer is random and
    small, and through it alone no byte can get more than about 1% (a loss above
    4.7), whatever the layers below learn. With the defaults (r 8, alpha 16, q_proj
    and v_proj) the loss moves from 5.96 to 5.89 in five windows; with r 8 on every
    layer and lm_head it stalls near 3, the bytes' frequencies, and generation loops.
    """

    window_size: int = 8
    learning_rate: float = 2.5e-3
    lora_r: int = 32
    lora_alpha: int = 96
    target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"
    versions: int = 40  # per adapter
    eval_fraction: float = 0.1  # the default: a tenth of the events held out, never trained
    offline_epochs: int = 3

    def environment(self) -> dict[str, str]:
        return {
            "LORASTREAM_WINDOW_SIZE": str(self.window_size),
            "LORASTREAM_LEARNING_RATE": str(self.learning_rate),
            "LORASTREAM_LORA_R": str(self.lora_r),
            "LORASTREAM_LORA_ALPHA": str(self.lora_alpha),
            "LORASTREAM_LORA_DROPOUT": "0",
            "LORASTREAM_LORA_TARGET_MODULES": self.target_modules,
            # Set, though it is the default, so that the caller's environment cannot change
            # which events train: the demo counts its windows in advance.
            "LORASTREAM_EVAL_FRACTION": str(self.eval_fraction),
            "LORASTREAM_STEPS_PER_WINDOW": "1",
        }


TRAINING = DemoTraining()

# Variables of the caller that would change what the demo shows: its own model, a partial
# window after a wait, injected faults, a metrics port another process may hold.
_NOT_PASSED = (
    "LORASTREAM_BASE_MODEL",
    "LORASTREAM_MAX_WAIT_SECONDS",
    "LORASTREAM_FAULTS",
    "LORASTREAM_METRICS_PORT",
)


# The settings the demo changes, by variable: the field whose default is shown beside it.
_DEFAULTS = {
    "LORASTREAM_WINDOW_SIZE": "window_size",
    "LORASTREAM_LEARNING_RATE": "learning_rate",
    "LORASTREAM_LORA_R": "lora_r",
    "LORASTREAM_LORA_ALPHA": "lora_alpha",
    "LORASTREAM_LORA_TARGET_MODULES": "lora_target_modules",
    "LORASTREAM_EVAL_FRACTION": "eval_fraction",
    "LORASTREAM_STEPS_PER_WINDOW": "steps_per_window",
}


def _default(name: str) -> str:
    """A setting's default as the README shows it (``2e-3`` for the learning rate)."""
    info = Settings.model_fields[name]
    extra = info.json_schema_extra
    shown = extra.get("shown") if isinstance(extra, dict) else None
    value = shown if shown is not None else info.default
    return f"{value:g}" if isinstance(value, float) else str(value)


class DemoError(LorastreamError):
    """The demo could not run to the end."""


def demo_records(events_per_adapter: int = TRAINING.window_size * TRAINING.versions) -> list[bytes]:
    """The data set: per adapter, ``events_per_adapter`` results that qualify and train,
    the qualifying ones the trainer holds out (by the hash of their id) on top, and one in
    four that does not qualify; the adapters interleaved, with :data:`BAD_LINES` in place.

    Of every four results of an adapter, one is a breakthrough (ROUGE-L 1.0 against
    its baseline, entropy down 0.35), two move the entropy by more than 0.15, and one
    moves it by 0.05 and is dropped. The ones that train alternate between the
    adapter's pairs, so that every window holds each pair equally often; so do the
    held-out ones.
    """
    from trainer.window import held_out

    per_adapter: dict[str, list[bytes]] = {}
    for adapter, pairs in TASKS.items():
        lines: list[bytes] = []
        trained = kept = 0
        i = 0
        while trained < events_per_adapter:
            kind = i % 4
            doc_id = f"{adapter}-{i:04d}"
            evaluated = kind < 3 and held_out(doc_id, TRAINING.eval_fraction)
            n = i if kind == 3 else kept if evaluated else trained
            prompt, response = pairs[n % len(pairs)]
            doc: dict[str, Any] = {
                "id": doc_id,
                "adapter": adapter,
                "prompt": prompt,
                "response": response,
            }
            if kind == 0:
                doc["baseline"] = response
            elif kind == 1:
                doc["baseline"] = response.split(" ", 1)[-1]
            delta = (-0.35, 0.22, -0.2, 0.05)[kind]
            doc["entropy_before"] = 2.0
            doc["entropy_after"] = round(2.0 + delta, 2)
            lines.append(orjson.dumps(doc))
            kept += evaluated
            trained += kind < 3 and not evaluated
            i += 1
        per_adapter[adapter] = lines
    good = [line for row in _zip_longest(list(per_adapter.values())) for line in row]
    for number in sorted(BAD_LINES):
        good.insert(number - 1, BAD_LINES[number])
    return good


def _zip_longest(columns: list[list[bytes]]) -> Iterator[list[bytes]]:
    for i in range(max(len(c) for c in columns)):
        yield [c[i] for c in columns if i < len(c)]


def run_demo(
    settings: Settings, console: Console, timeout: float = 600.0, keep: bool = False
) -> None:
    """Run the demo; everything it made is cleaned up on every path unless ``keep``."""
    console.print(
        "[bold]lorastream demo[/]: generation results → score → train LoRA → announce → load, "
        "on a real Kafka broker, in under a minute",
        highlight=False,
    )
    run = _Run(settings, console, timeout, keep)
    with _sigterm_as_interrupt():
        try:
            run.go()
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: stopping the workers and cleaning up")
            run.interrupted = True
            raise
        except BaseException:
            run.failed = True
            raise
        finally:
            run.clean_up()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so that ``kill`` cleans up as Ctrl-C does."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class _Run:
    """One demo run: what it started and made, so that clean-up undoes exactly that."""

    settings: Settings
    console: Console
    timeout: float
    keep: bool
    failed: bool = False  # an error: the workers' logs are shown before they are removed
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)
    bootstrap: str = ""
    broker: Any = None  # the LocalBroker this run started, if any
    topics_made: bool = False
    work: Path | None = None  # the temporary directory, without --keep
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    updates: list[AdapterUpdate] = field(default_factory=list)
    first_version: float = 0.0  # seconds from the start to the first announcement

    def __post_init__(self) -> None:
        prefix = self.settings.topic_prefix or f"demo-{uuid.uuid4().hex[:6]}."
        self.prefix = prefix
        self.name = prefix.rstrip(".") or "demo"
        self.settings = self.settings.model_copy(update={"topic_prefix": prefix})
        self.topics = self.settings.topics
        self.results = self.settings.home / "demo" / self.name  # the picture; with --keep all
        if self.keep:
            self.logs = self.results
            self.adapters = (Path(self.settings.adapter_dir) / self.name).resolve()
        else:
            self.work = Path(tempfile.mkdtemp(prefix=f"lorastream-{self.name}-"))
            self.logs = self.work
            self.adapters = self.work / "adapters"
        self.logs.mkdir(parents=True, exist_ok=True)

    # ── output ───────────────────────────────────────────────────────────────

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def plain(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def stage(self, number: int, title: str) -> None:
        self.console.rule(f"[bold]{number}. {title}", align="left")

    def clock(self) -> str:
        return f"{time.monotonic() - self.started:.1f}s"

    @property
    def options(self) -> dict[str, Any]:
        return self.settings.kafka_client_options()

    # ── the stages ───────────────────────────────────────────────────────────

    def go(self) -> None:
        self.kafka()
        lines = self.produce()
        expected = self.start_workers(lines)
        self.follow(expected)
        self.dead_letters()
        self._signal_workers()  # their work is done; they shut down while the demo goes on
        self.picture(lines)
        self.load()

    def kafka(self) -> None:
        from lorastream.dev.broker import LocalBroker, kafka_answers

        self.stage(1, "Kafka")
        servers = self.settings.bootstrap_servers
        with self.console.status(f"looking for a Kafka broker at {servers}…"):
            answers = kafka_answers(servers)
        if answers:
            self.bootstrap = servers
            self.say(f"using the Kafka broker that answers at {servers}")
        else:
            port = int(servers.split(",")[0].rsplit(":", 1)[-1])
            broker = LocalBroker(self.settings.home / "broker", port=port, controller_port=port + 1)
            with self.console.status(
                f"no broker answers at {servers}: starting the local KRaft broker "
                "(the first start fetches its jars from Maven Central)…"
            ):
                self.bootstrap = broker.start()
            self.broker = broker
            self.say(
                f"started the local broker at {self.bootstrap} ({self.clock()}); "
                "it is stopped at the end"
            )
        self.settings = self.settings.model_copy(update={"bootstrap_servers": self.bootstrap})
        with self.console.status(f"creating the topics {self.prefix}*…"):
            asyncio.run(self._create_topics())
        self.topics_made = True
        self.say(
            f"created {len(self.topics.all())} topics named [bold]{escape(self.prefix)}*[/] "
            f"({'kept' if self.keep else 'deleted at the end; --keep keeps them'}): "
            f"{', '.join(name.removeprefix(self.prefix) for name in self.topics.all())}"
        )

    async def _create_topics(self) -> None:
        from lorastream.ops.admin import create_topics, list_topics, topic_specs

        existing = await list_topics(self.bootstrap, self.prefix, self.options)
        if existing:
            raise DemoError(
                f"{len(existing)} topics starting with {self.prefix!r} exist already, e.g. "
                f"{existing[0].name}; the demo needs a prefix of its own, so unset "
                "LORASTREAM_TOPIC_PREFIX (a fresh demo-… prefix is made) or give a new --topic-prefix"
            )
        await create_topics(self.bootstrap, topic_specs(self.topics, 3, 1), self.options)

    def produce(self) -> list[bytes]:
        from lorastream.ops.produce import produce_file, validate_file

        self.stage(2, "Produce generation results")
        data = self.logs / "generation-results.jsonl"
        lines = demo_records()
        data.write_bytes(b"\n".join(lines) + b"\n")
        self.say(
            f"{len(lines)} lines of GenerationResult JSON for two adapters "
            f"({', '.join(TASKS)}), {len(BAD_LINES)} of them broken on purpose; "
            "`produce` validates every line first and names each bad one:"
        )
        report = validate_file(data)
        for error in report.bad:
            self.plain(f"  {error.at_line_of(data.name)}")
        with self.console.status(f"producing to {self.topics.generation_results}…"):
            sent = asyncio.run(
                produce_file(data, self.bootstrap, self.topics.generation_results, self.options)
            )
            asyncio.run(self._produce_raw(BAD_RECORDS))
        self.say(
            f"produced {sent} results to {self.topics.generation_results}, keyed by adapter; "
            f"and {len(BAD_RECORDS)} bad records straight to Kafka, past the validation, "
            "for the scorer to refuse"
        )
        return lines

    async def _produce_raw(self, records: list[tuple[bytes, bytes]]) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", **self.options)
        await producer.start()
        try:
            for key, value in records:
                await producer.send_and_wait(self.topics.generation_results, key=key, value=value)
        finally:
            await producer.stop()

    def start_workers(self, lines: list[bytes]) -> Counter[str]:
        self.stage(3, "Score and train")
        env = {k: v for k, v in os.environ.items() if k not in _NOT_PASSED}
        env.update(
            {
                "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "LORASTREAM_TOPIC_PREFIX": self.prefix,
                "LORASTREAM_ADAPTER_DIR": str(self.adapters),
                "LORASTREAM_HOME": str(self.settings.home),
                "LORASTREAM_DEVICE": "cpu",  # the tiny model gains nothing on a GPU; CPU is exact
                "OMP_NUM_THREADS": "1",  # one step is milliseconds: threads would only contend
                **TRAINING.environment(),
            }
        )
        for name, args in (("scorer", ["score"]), ("trainer", ["train"])):
            with (self.logs / f"{name}.log").open("ab") as log:
                self.workers[name] = subprocess.Popen(
                    [sys.executable, "-m", "lorastream", *args],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches the demo, which stops them in order
                )
        qualifying, held = self._qualifying(lines)
        t = self.settings.thresholds
        self.say(
            f"scorer (`lorastream score`, a Faust worker): ROUGE-L of each response against its "
            f"baseline and the entropy change; it keeps breakthroughs (ROUGE-L > "
            f"{t.rouge} and Δentropy < {t.breakthrough_entropy}) and big changes "
            f"(|Δentropy| > {t.qualify_entropy}): {sum(qualifying.values())} of "
            f"{len(lines) - len(BAD_LINES)} → {self.topics.learning_events}"
        )
        self.say(
            f"trainer (`lorastream train`): every window of {TRAINING.window_size} events of an "
            "adapter is ONE AdamW step of PEFT LoRA on the built-in tiny Llama (2 layers, "
            "hidden 64, byte-level tokenizer), on the CPU; files first, then the announcement "
            "and the offsets in one Kafka transaction"
        )
        self.say(
            f"held out: {sum(held.values())} of the {sum(qualifying.values())} events (a tenth, "
            "by the sha256 of the event id) never train; every version is evaluated on its "
            "adapter's, and its announcement says how (`eval`)"
        )
        self.say(
            "the demo's own training settings, so that the random tiny model learns its pairs "
            f"by heart in {TRAINING.versions} steps (defaults in brackets; with them the loss "
            "would hardly leave chance):"
        )
        for variable, value in TRAINING.environment().items():
            if variable in _DEFAULTS:
                self.plain(f"  {variable}={value}  [{_default(_DEFAULTS[variable])}]")
        self.plain(
            "  (lm_head: the tiny model's output layer is random, and through it alone no byte "
            "can get more than about 1%)"
        )
        self.say(
            f"logs: {self.logs / 'scorer.log'}, {self.logs / 'trainer.log'}"
            + ("" if self.keep else " (removed at the end; --keep keeps them)")
        )
        return Counter({a: (n - held[a]) // TRAINING.window_size for a, n in qualifying.items()})

    def _qualifying(self, lines: list[bytes]) -> tuple[Counter[str], Counter[str]]:
        """Per adapter, the events the scorer will emit (its own rule, applied here), and
        how many of them the trainer holds out."""
        from schemas import KafkaPosition
        from streams.scoring import process
        from trainer.window import held_out

        where = KafkaPosition(self.topics.generation_results, 0, 0)
        counts: Counter[str] = Counter()
        held: Counter[str] = Counter()
        for line in lines:
            event = process(line, where, None, self.settings.thresholds).event
            if event is not None:
                counts[event.adapter] += 1
                held[event.adapter] += held_out(event.id, TRAINING.eval_fraction)
        return counts, held

    def follow(self, expected: Counter[str]) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        total = sum(expected.values())
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<12}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
        )
        tasks = {
            adapter: progress.add_task(adapter, total=n, note="waiting for the workers to start")
            for adapter, n in sorted(expected.items())
        }
        with progress:
            asyncio.run(self._follow(total, progress, tasks))
        if len(self.updates) < total:
            raise DemoError(
                f"only {len(self.updates)} of {total} versions were announced within "
                f"{self.timeout:.0f}s (--timeout)"
            )
        self.say(
            f"{total} versions announced on {self.topics.adapter_updates}: the first "
            f"{self.first_version:.1f}s after the start, the last {self.clock()} after it"
        )

    async def _follow(self, total: int, progress: Progress, tasks: dict[str, TaskID]) -> None:
        from lorastream.ops.follow import follow

        def seen(update: AdapterUpdate, _raw: bytes) -> None:
            if not self.updates:
                _preload()
                self.first_version = time.monotonic() - self.started
                w = update.window
                progress.console.print(
                    f"first version after {self.first_version:.1f}s: "
                    f"{update.adapter} v{update.version} = "
                    f"window {w} "
                    f"({w.size} events), loss {update.train_loss:.2f}, "
                    f"files in {update.uri.removeprefix('file://')}",
                    highlight=False,
                    soft_wrap=True,
                )
            self.updates.append(update)
            task = tasks.get(update.adapter)
            if task is not None:
                progress.update(
                    task, completed=update.version, note=f"loss {update.train_loss:.2f}"
                )

        following = asyncio.create_task(
            follow(
                self.bootstrap,
                self.topics.adapter_updates,
                seen,
                from_beginning=True,
                count=total,
                timeout=self.timeout,
                client_options=self.options,
            )
        )
        while not following.done():
            await asyncio.wait({following}, timeout=0.5)
            for name, process in self.workers.items():
                if process.poll() is not None and not following.done():
                    following.cancel()
                    with suppress(asyncio.CancelledError):
                        await following
                    raise DemoError(
                        f"the {name} stopped (exit code {process.returncode}) before every "
                        f"version was announced; the logs are shown above"
                    )
        following.result()

    def dead_letters(self) -> None:
        from schemas import SchemaError
        from schemas.deadletter import DeadLetterHeaders

        self.stage(4, "What was refused, and why")
        self.say(
            f"`produce` refused the {len(BAD_LINES)} bad lines above before sending anything; "
            f"the scorer refuses bad records that reach Kafka: each goes to "
            f"{self.topics.dead_letters} as it came, with the reason and its position in headers"
        )
        with self.console.status("reading the dead letters…"):
            records = asyncio.run(self._read_dead_letters(len(BAD_RECORDS), 30.0))
        self.say(f"{len(records)} dead letters:")
        for record in records:
            try:
                h = DeadLetterHeaders.from_kafka(record.headers)
            except SchemaError as exc:
                self.plain(f"  {record.topic}[{record.partition}]@{record.offset}: {exc}")
                continue
            where = f"{h.source_topic}[{h.source_partition}]@{h.source_offset}"
            self.plain(f"  {where}: {h.error.replace(f' at {where}', '')}")
        if len(records) < len(BAD_RECORDS):
            raise DemoError(
                f"{len(BAD_RECORDS)} dead letters were expected on {self.topics.dead_letters}, "
                f"{len(records)} came"
            )

    async def _read_dead_letters(
        self, expected: int, timeout: float
    ) -> list[ConsumerRecord[bytes, bytes]]:
        from trainer.history import read_committed_topic

        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            records, _ = await read_committed_topic(
                self.bootstrap, self.topics.dead_letters, self.options
            )
            if len(records) >= expected or asyncio.get_running_loop().time() >= deadline:
                return records
            await asyncio.sleep(0.3)

    def picture(self, lines: list[bytes]) -> None:
        from lorastream.demo.picture import Panel, draw_learning

        self.stage(5, "What the adapters learned")
        newest: dict[str, AdapterUpdate] = {}
        series: dict[str, list[AdapterUpdate]] = {}
        for update in sorted(self.updates, key=lambda u: (u.adapter, u.version)):
            series.setdefault(update.adapter, []).append(update)
            newest[update.adapter] = update
        with self.console.status(
            f"an offline fine-tune on the same events ({TRAINING.offline_epochs} epochs), "
            "for comparison…"
        ):
            offline = self._offline(lines, series)
        panels = []
        for adapter, updates in series.items():
            first = next((u.eval for u in updates if u.eval is not None), None)
            panels.append(
                Panel(
                    title=adapter,
                    versions=[u.version for u in updates],
                    train=[u.train_loss for u in updates],
                    held_out=[u.eval.loss if u.eval else None for u in updates],
                    base=first.base_loss if first else None,
                    offline=offline[adapter][-1] if adapter in offline else None,
                    offline_label=f"offline, {TRAINING.offline_epochs} epochs, same events",
                )
            )
        self.results.mkdir(parents=True, exist_ok=True)
        png = self.results / "loss.png"
        with self.console.status("drawing the loss of every version…"):
            draw_learning(
                png,
                panels,
                f"lorastream demo {self.name}: windows of {TRAINING.window_size} events, "
                f"LoRA r {TRAINING.lora_r}, learning rate {TRAINING.learning_rate:g}",
                "version (one AdamW step per window)",
                chance=CHANCE,
            )
        self.say(f"loss per version: {png}")
        for adapter, updates in series.items():
            below = next((u.version for u in updates if u.train_loss < 2.0), None)
            self.plain(
                f"  {adapter}: {updates[0].train_loss:.2f} → {updates[-1].train_loss:.2f} "
                f"over {len(updates)} versions" + (f" (below 2 from v{below})" if below else "")
            )
            last = newest[adapter]
            if last.eval is not None and adapter in offline:
                epochs = offline[adapter]
                self.plain(
                    f"    held-out ({last.eval.events} events): base {last.eval.base_loss:.2f} "
                    f"→ v{last.version} {last.eval.loss:.2f}; an offline fine-tune on the same "
                    f"{len(updates) * TRAINING.window_size} events: {epochs[0]:.2f} after one "
                    f"epoch (as many steps as the stream), {epochs[-1]:.2f} after "
                    f"{len(epochs)}"
                )
        self.say(
            f"chance level is ln {VOCABULARY} = {CHANCE:.2f}: the tiny model reads and writes "
            f"bytes ({VOCABULARY} token ids), and a model that knows nothing spreads its bet "
            "evenly over them. The base model is random, so v1 starts there; each version's "
            "train loss is its window's mean cross-entropy per response token, measured just "
            "before its step, and its held-out loss is measured after it on events no window "
            "trained on (here they repeat the trained pairs, so it measures how well they "
            "were learnt; bench/bench_learning.py holds out pairs never seen). The offline "
            f"line: a fresh LoRA trained on the same events, shuffled, "
            f"{TRAINING.offline_epochs} times over."
        )

    def _offline(
        self, lines: list[bytes], series: dict[str, list[AdapterUpdate]]
    ) -> dict[str, list[float]]:
        """Per adapter: the held-out loss (on its newest version's evaluation set) of an
        offline fine-tune on exactly the events its windows trained on, after each epoch."""
        from trainer.evaluation import decode_eval_set
        from trainer.lora import LoraSettings, LoraStepper
        from trainer.model import load_base_model
        from trainer.offline import fine_tune, mean_loss
        from trainer.store import EVAL_SET_FILE

        _quiet_transformers()
        import torch

        torch.set_num_threads(1)  # the tiny model's ops take microseconds: see load()
        pairs: dict[str, tuple[str, str]] = {}
        for line in lines:
            with suppress(orjson.JSONDecodeError, KeyError, TypeError):
                doc = orjson.loads(line)
                pairs[doc["id"]] = (doc["prompt"], doc["response"])
        any_update = next(iter(series.values()))[-1]
        base = load_base_model(Path(any_update.base_model), torch.device("cpu"))
        lora = LoraSettings(
            r=TRAINING.lora_r,
            alpha=TRAINING.lora_alpha,
            target_modules=tuple(TRAINING.target_modules.split(",")),
            learning_rate=TRAINING.learning_rate,
        )
        stepper = LoraStepper(base, lora, seed=self.settings.seed)
        losses = {}
        for adapter, updates in series.items():
            eval_file = Path(updates[-1].uri) / EVAL_SET_FILE
            if not eval_file.exists():
                continue
            held = [(e.prompt, e.response) for e in decode_eval_set(eval_file.read_bytes(), "")]
            events = [pairs[i] for u in updates for i in u.window.event_ids]
            states = fine_tune(
                stepper, events, TRAINING.window_size, TRAINING.offline_epochs, f"offline-{adapter}"
            )
            losses[adapter] = [mean_loss(stepper, state, held) for state in states]
        return losses

    def load(self) -> None:
        self.stage(6, "Load with PEFT, as a serving system would")
        newest: dict[str, AdapterUpdate] = {}
        for update in self.updates:
            if update.version >= newest.get(update.adapter, update).version:
                newest[update.adapter] = update
        self.say(
            "from each adapter's newest announcement alone: "
            "AutoModelForCausalLM.from_pretrained(update.base_model), then "
            "PeftModel.from_pretrained(base, update.uri)"
        )
        with self.console.status("loading torch, transformers and PEFT…"):
            _quiet_transformers()
            import torch

            # The tiny model's ops take microseconds: a second thread only adds contention
            # (a greedy generation took 0.3-1 s with two threads here, 20 ms with one).
            torch.set_num_threads(1)
        for adapter in sorted(newest):
            self._load_one(newest[adapter], TASKS.get(adapter, []))

    def _load_one(self, update: AdapterUpdate, pairs: list[tuple[str, str]]) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from trainer.lora import IGNORE, build_batch

        # Until every announcement carries a plain path, an older one may still say file://.
        adapter_dir = update.uri.removeprefix("file://")
        base = AutoModelForCausalLM.from_pretrained(update.base_model)
        tokenizer = AutoTokenizer.from_pretrained(update.base_model)
        model = PeftModel.from_pretrained(base, adapter_dir)
        model.eval()
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        self.plain(
            f"{update.adapter} v{update.version}: loaded {adapter_dir} "
            f"({lora:,} LoRA parameters) on {update.base_model}"
        )
        if not pairs:
            return
        ids, mask, labels = build_batch(tokenizer, pairs, 512)
        with torch.no_grad():
            tuned = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
            with model.disable_adapter():
                plain = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        tokens = int((labels != IGNORE).sum())
        self.plain(
            f"  loss on its {len(pairs)} pairs ({tokens} response tokens): "
            f"base {plain:.2f} → with the adapter {tuned:.2f} (chance {CHANCE:.2f})"
        )
        prompt, response = pairs[0]
        with torch.no_grad():
            after = _greedy(model, tokenizer, prompt, len(response.encode()) + 8)
            with model.disable_adapter():
                before = _greedy(model, tokenizer, prompt, len(response.encode()) + 8)
        verdict = (
            "the trained response, exactly"
            if after == response
            else f"{_common_prefix(after, response)} of {len(response)} characters right"
        )
        self.plain(f"  greedy generation for {prompt!r} (trained on {response!r}):")
        self.plain(f"    base model        {_shown(before)}")
        self.plain(f"    with the adapter  {_shown(after)}   ← {verdict}")

    # ── clean-up ─────────────────────────────────────────────────────────────

    def clean_up(self) -> None:
        """Stop the workers; unless --keep, delete the topics and the temporary directory;
        stop the broker if this run started it. Each step runs even if one before failed."""
        self._stop_workers()
        if self.failed:
            self._show_logs()
        if not self.keep:
            self.stage(7, "Clean-up")
            self._attempt("delete the topics", self._delete_topics)
            self._attempt("remove the temporary directory", self._remove_files)
        else:
            self._show_kept()
        if self.broker is not None:
            self._attempt("stop the broker", self._stop_broker)
        if not (self.failed or self.interrupted):
            self.console.rule(f"[bold green]done in {self.clock()}", align="left")

    def _attempt(self, what: str, step: Any) -> None:
        try:
            step()
        except Exception as exc:
            self.plain(f"could not {what}: {type(exc).__name__}: {exc}")

    def _signal_workers(self) -> list[subprocess.Popen[bytes]]:
        running = [p for p in self.workers.values() if p.poll() is None]
        for process in running:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        return running

    def _stop_workers(self) -> None:
        running = self._signal_workers()
        for process in running:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def _show_logs(self, lines: int = 15) -> None:
        for name in self.workers:
            log = self.logs / f"{name}.log"
            if not log.is_file():
                continue
            text = _TERMINAL_CODES.sub("", log.read_text(errors="replace"))
            tail = [line for line in text.splitlines() if line.strip()][-lines:]
            self.say(f"[bold]last lines of the {name}'s log[/] ({log}):")
            for line in tail:
                self.plain(f"  {line}")

    def _delete_topics(self) -> None:
        if not self.topics_made:
            return
        from lorastream.ops.admin import delete_topics, list_topics

        async def delete() -> list[str]:
            # The prefix was checked to be unused before the run, so every topic under it is
            # the run's: its five, and any the scorer's Faust app made for itself.
            found = await list_topics(self.bootstrap, self.prefix, self.options)
            return await delete_topics(self.bootstrap, [t.name for t in found], self.options)

        deleted = asyncio.run(delete())
        self.say(f"deleted {len(deleted)} topics {escape(self.prefix)}* on {self.bootstrap}")

    def _remove_files(self) -> None:
        removed = []
        if self.workers:  # the scorer's Faust state, under the run's own app id
            faust = self.settings.home / "faust" / self.settings.scorer_app_id
            shutil.rmtree(faust, ignore_errors=True)
            removed.append(str(faust))
        if self.work is not None:
            shutil.rmtree(self.work)
            removed.insert(0, f"{self.work} (data, logs, adapters)")
        if removed:
            self.say(f"removed {' and '.join(removed)}")
        if self.results.is_dir() and not any(self.results.iterdir()):
            self.results.rmdir()
        elif self.results.is_dir():
            self.say(f"kept {self.results} (the picture)")

    def _stop_broker(self) -> None:
        self.broker.stop()
        self.say("stopped the local broker this run started")

    def _show_kept(self) -> None:
        self.stage(7, "Kept (--keep)")
        self.plain(f"topics    {self.prefix}* on {self.bootstrap}")
        self.plain(f"adapters  {self.adapters}/<adapter>/v<version>/")
        self.plain(f"files     {self.logs} (data, logs, picture)")
        self.plain(
            f"look      LORASTREAM_TOPIC_PREFIX={self.prefix} lorastream adapters list "
            "(or dead-letters list)"
        )
        self.plain(f"delete    lorastream topics delete --prefix {self.prefix} --yes")


def _preload() -> None:
    """Import what the last steps need in a background thread, while the trainer works:
    torch, transformers and PEFT take seconds to import, and the demo only waits meanwhile."""
    import threading

    def load() -> None:
        with suppress(Exception):  # the step that needs a module imports it again, and reports
            import matplotlib.backends.backend_agg  # noqa: F401
            import transformers.models.llama.modeling_llama  # noqa: F401
            from peft import PeftModel  # noqa: F401
            from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    threading.Thread(target=load, name="lorastream-demo-preload", daemon=True).start()


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding of ``prompt`` as the trainer lays a prompt out (``build_batch``)."""
    import torch

    bos = tokenizer.bos_token_id
    ids = ([bos] if bos is not None else []) + tokenizer(prompt, add_special_tokens=False).input_ids
    input_ids = torch.tensor([ids])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


def _shown(text: str, width: int = 48) -> str:
    return repr(text if len(text) <= width else text[:width] + "…")


def _common_prefix(a: str, b: str) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
