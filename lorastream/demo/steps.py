"""The demo's steps up to the last announcement: the broker, the run's topics, the data
produced (bad lines and records on purpose), the scorer and the trainer as worker
processes, every version followed as it is announced, and the dead letters read back.

Each step is a function of the :class:`~lorastream.demo.run.Run`, in the order
:func:`lorastream.demo.run_demo` calls them; each says what it does while it does it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from contextlib import suppress
from typing import TYPE_CHECKING

from rich.markup import escape

from lorastream.demo.data import (
    BAD_LINES,
    BAD_RECORDS,
    DEFAULTS,
    NOT_PASSED,
    TASKS,
    TRAINING,
    default,
    demo_records,
)
from lorastream.demo.learned import preload
from lorastream.demo.run import DemoError, Run
from lorastream.dev.process import start_group
from schemas import AdapterUpdate, KafkaPosition

if TYPE_CHECKING:
    from aiokafka.structs import ConsumerRecord
    from rich.progress import Progress, TaskID

__all__ = ["follow_versions", "prepare_kafka", "produce", "show_dead_letters", "start_workers"]


def prepare_kafka(run: Run) -> None:
    """Use the broker that answers, or start the local one; create the run's topics."""
    from lorastream.dev.broker import LocalBroker, kafka_answers

    run.stage(1, "Kafka")
    servers = run.settings.bootstrap_servers
    with run.console.status(f"looking for a Kafka broker at {servers}…"):
        answers = kafka_answers(servers)
    if answers:
        run.bootstrap = servers
        run.say(f"using the Kafka broker that answers at {servers}")
    else:
        port = int(servers.split(",")[0].rsplit(":", 1)[-1])
        broker = LocalBroker(run.settings.home / "broker", port=port, controller_port=port + 1)
        with run.console.status(
            f"no broker answers at {servers}: starting the local KRaft broker "
            "(the first start fetches its jars from Maven Central)…"
        ):
            run.bootstrap = broker.start()
        run.broker = broker
        run.say(
            f"started the local broker at {run.bootstrap} ({run.clock()}); it is stopped at the end"
        )
    run.settings = run.settings.model_copy(update={"bootstrap_servers": run.bootstrap})
    with run.console.status(f"creating the topics {run.prefix}*…"):
        asyncio.run(_create_topics(run))
    run.topics_made = True
    run.say(
        f"created {len(run.topics.all())} topics named [bold]{escape(run.prefix)}*[/] "
        f"({'kept' if run.keep else 'deleted at the end; --keep keeps them'}): "
        f"{', '.join(name.removeprefix(run.prefix) for name in run.topics.all())}"
    )


async def _create_topics(run: Run) -> None:
    from lorastream.ops.admin import create_topics, list_topics, topic_specs

    existing = await list_topics(run.kafka, run.prefix)
    if existing:
        raise DemoError(
            f"{len(existing)} topics starting with {run.prefix!r} exist already, e.g. "
            f"{existing[0].name}; the demo needs a prefix of its own, so unset "
            "LORASTREAM_TOPIC_PREFIX (a fresh demo-… prefix is made) or give a new --topic-prefix"
        )
    await create_topics(run.kafka, topic_specs(run.topics, 3, 1))


def produce(run: Run) -> list[bytes]:
    """Write the data set, name its bad lines, produce the rest and the bad records.
    The lines, bad ones included, for the steps that count what the scorer keeps."""
    from lorastream.ops.produce import produce_file, validate_file

    run.stage(2, "Produce generation results")
    data = run.logs / "generation-results.jsonl"
    lines = demo_records()
    data.write_bytes(b"\n".join(lines) + b"\n")
    run.say(
        f"{len(lines)} lines of GenerationResult JSON for two adapters "
        f"({', '.join(TASKS)}), {len(BAD_LINES)} of them broken on purpose; "
        "`produce` validates every line first and names each bad one:"
    )
    report = validate_file(data)
    for error in report.bad:
        run.plain(f"  {error.at_line_of(data.name)}")
    with run.console.status(f"producing to {run.topics.generation_results}…"):
        sent = asyncio.run(produce_file(data, run.kafka, run.topics.generation_results))
        asyncio.run(_produce_raw(run, BAD_RECORDS))
    run.say(
        f"produced {sent} results to {run.topics.generation_results}, keyed by adapter; "
        f"and {len(BAD_RECORDS)} bad records straight to Kafka, past the validation, "
        "for the scorer to refuse"
    )
    return lines


async def _produce_raw(run: Run, records: list[tuple[bytes, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(acks="all", **run.kafka.client_kwargs())
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(run.topics.generation_results, key=key, value=value)
    finally:
        await producer.stop()


def start_workers(run: Run, lines: list[bytes]) -> Counter[str]:
    """Start the scorer and the trainer and say what each does. The number of versions
    each adapter will get."""
    run.stage(3, "Score and train")
    env = {k: v for k, v in os.environ.items() if k not in NOT_PASSED}
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": run.bootstrap,
            "LORASTREAM_TOPIC_PREFIX": run.prefix,
            "LORASTREAM_ADAPTER_DIR": str(run.adapters),
            "LORASTREAM_HOME": str(run.settings.home),
            "LORASTREAM_DEVICE": "cpu",  # the tiny model gains nothing on a GPU; CPU is exact
            "OMP_NUM_THREADS": "1",  # one step is milliseconds: threads would only contend
            **TRAINING.environment(),
        }
    )
    for name, args in (("scorer", ["score"]), ("trainer", ["train"])):
        # A session of its own: Ctrl-C reaches the demo, which stops them in order.
        run.workers[name] = start_group(
            [sys.executable, "-m", "lorastream", *args], log=run.logs / f"{name}.log", env=env
        )
    qualifying, held = _qualifying(run, lines)
    t = run.settings.thresholds
    run.say(
        f"scorer (`lorastream score`, a Faust worker): ROUGE-L of each response against its "
        f"baseline and the entropy change; it keeps breakthroughs (ROUGE-L > "
        f"{t.rouge} and Δentropy < {t.breakthrough_entropy}) and big changes "
        f"(|Δentropy| > {t.qualify_entropy}): {sum(qualifying.values())} of "
        f"{len(lines) - len(BAD_LINES)} → {run.topics.learning_events}"
    )
    run.say(
        f"trainer (`lorastream train`): every window of {TRAINING.window_size} events of an "
        "adapter is ONE AdamW step of PEFT LoRA on the built-in tiny Llama (2 layers, "
        "hidden 64, byte-level tokenizer), on the CPU; files first, then the announcement "
        "and the offsets in one Kafka transaction"
    )
    run.say(
        f"held out: {sum(held.values())} of the {sum(qualifying.values())} events (a tenth, "
        "by the sha256 of the event id) never train; every version is evaluated on its "
        "adapter's, and its announcement says how (`eval`)"
    )
    run.say(
        "the demo's own training settings, so that the random tiny model learns its pairs "
        f"by heart in {TRAINING.versions} steps (defaults in brackets; with them the loss "
        "would hardly leave chance):"
    )
    for variable, value in TRAINING.environment().items():
        if variable in DEFAULTS:
            run.plain(f"  {variable}={value}  [{default(DEFAULTS[variable])}]")
    run.plain(
        "  (lm_head: the tiny model's output layer is random, and through it alone no byte "
        "can get more than about 1%)"
    )
    run.say(
        f"logs: {run.logs / 'scorer.log'}, {run.logs / 'trainer.log'}"
        + ("" if run.keep else " (removed at the end; --keep keeps them)")
    )
    return Counter({a: (n - held[a]) // TRAINING.window_size for a, n in qualifying.items()})


def _qualifying(run: Run, lines: list[bytes]) -> tuple[Counter[str], Counter[str]]:
    """Per adapter, the events the scorer will emit (its own rule, applied here), and
    how many of them the trainer holds out."""
    from streams.scoring import process
    from trainer.window import held_out

    where = KafkaPosition(run.topics.generation_results, 0, 0)
    counts: Counter[str] = Counter()
    held: Counter[str] = Counter()
    for line in lines:
        event = process(line, where, None, run.settings.thresholds).event
        if event is not None:
            counts[event.adapter] += 1
            held[event.adapter] += held_out(event.id, TRAINING.eval_fraction)
    return counts, held


def follow_versions(run: Run, expected: Counter[str]) -> None:
    """Follow the announcements until every expected version came; a DemoError if a
    worker stopped first or the timeout passed."""
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
        console=run.console,
        disable=not run.console.is_terminal,
    )
    tasks = {
        adapter: progress.add_task(adapter, total=n, note="waiting for the workers to start")
        for adapter, n in sorted(expected.items())
    }
    with progress:
        asyncio.run(_follow(run, total, progress, tasks))
    if len(run.updates) < total:
        raise DemoError(
            f"only {len(run.updates)} of {total} versions were announced within "
            f"{run.timeout:.0f}s (--timeout)"
        )
    run.say(
        f"{total} versions announced on {run.topics.adapter_updates}: the first "
        f"{run.first_version:.1f}s after the start, the last {run.clock()} after it"
    )


async def _follow(run: Run, total: int, progress: Progress, tasks: dict[str, TaskID]) -> None:
    from lorastream.ops.follow import follow as follow_topic

    def seen(update: AdapterUpdate, _raw: bytes) -> None:
        if not run.updates:
            preload()
            run.first_version = time.monotonic() - run.started
            w = update.window
            progress.console.print(
                f"first version after {run.first_version:.1f}s: "
                f"{update.adapter} v{update.version} = "
                f"window {w} "
                f"({w.size} events), loss {update.train_loss:.2f}, "
                f"files in {update.uri.removeprefix('file://')}",
                highlight=False,
                soft_wrap=True,
            )
        run.updates.append(update)
        task = tasks.get(update.adapter)
        if task is not None:
            progress.update(task, completed=update.version, note=f"loss {update.train_loss:.2f}")

    following = asyncio.create_task(
        follow_topic(
            run.kafka,
            run.topics.adapter_updates,
            seen,
            from_beginning=True,
            count=total,
            timeout=run.timeout,
        )
    )
    while not following.done():
        await asyncio.wait({following}, timeout=0.5)
        for name, process in run.workers.items():
            if process.poll() is not None and not following.done():
                following.cancel()
                with suppress(asyncio.CancelledError):
                    await following
                raise DemoError(
                    f"the {name} stopped (exit code {process.returncode}) before every "
                    f"version was announced; the logs are shown above"
                )
    following.result()


def show_dead_letters(run: Run) -> None:
    """Read back the dead letters and show each one's reason and source position."""
    from schemas import SchemaError
    from schemas.deadletter import DeadLetterHeaders

    run.stage(4, "What was refused, and why")
    run.say(
        f"`produce` refused the {len(BAD_LINES)} bad lines above before sending anything; "
        f"the scorer refuses bad records that reach Kafka: each goes to "
        f"{run.topics.dead_letters} as it came, with the reason and its position in headers"
    )
    with run.console.status("reading the dead letters…"):
        records = asyncio.run(_read_dead_letters(run, len(BAD_RECORDS), 30.0))
    run.say(f"{len(records)} dead letters:")
    for record in records:
        try:
            h = DeadLetterHeaders.from_kafka(record.headers)
        except SchemaError as exc:
            run.plain(f"  {KafkaPosition(record.topic, record.partition, record.offset)}: {exc}")
            continue
        where = str(KafkaPosition(h.source_topic, h.source_partition, h.source_offset))
        run.plain(f"  {where}: {h.error.replace(f' at {where}', '')}")
    if len(records) < len(BAD_RECORDS):
        raise DemoError(
            f"{len(BAD_RECORDS)} dead letters were expected on {run.topics.dead_letters}, "
            f"{len(records)} came"
        )


async def _read_dead_letters(
    run: Run, expected: int, timeout: float
) -> list[ConsumerRecord[bytes, bytes]]:
    from trainer.committed import read_committed_topic

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        records, _ = await read_committed_topic(run.kafka, run.topics.dead_letters)
        if len(records) >= expected or asyncio.get_running_loop().time() >= deadline:
            return records
        await asyncio.sleep(0.3)
