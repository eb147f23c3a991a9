"""``lorastream demo``: the whole pipeline on the local broker, start to finish.

Starts the local Kafka (unless one already answers at the bootstrap
address), creates a fresh set of topics, produces a small generated data
set (with a few bad lines, to show the dead-letter topic), runs the scoring
worker and the trainer as real processes, follows the announcements until
every full window is a version, then prints the lineage, loads the newest
version of each adapter with PEFT and stops what it started.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from lorastream.settings import Settings
from schemas import AdapterUpdate
from schemas.errors import LorastreamError

__all__ = ["demo_records", "run_demo"]

TASKS = {
    "math-tutor": [
        ("What is 7 times 8?", "7 times 8 is 56."),
        ("What is 12 plus 30?", "12 plus 30 is 42."),
        ("What is 9 squared?", "9 squared is 81."),
        ("Half of 64?", "Half of 64 is 32."),
    ],
    "support-bot": [
        ("My order is late.", "Sorry! Your order ships today."),
        ("How do I reset my password?", "Use the Forgot password link."),
        ("Can I get a refund?", "Yes, within 30 days of purchase."),
    ],
}


class DemoError(LorastreamError):
    """The demo could not run to the end."""


def demo_records(per_adapter: dict[str, int] | None = None) -> list[bytes]:
    """A deterministic data set: three of four results qualify, and three lines are bad."""
    per_adapter = per_adapter or {"math-tutor": 72, "support-bot": 48}
    lines: list[bytes] = []
    for adapter, count in per_adapter.items():
        pairs = TASKS[adapter]
        for i in range(count):
            prompt, response = pairs[i % len(pairs)]
            kind = i % 4
            baseline = response if kind == 0 else response.split(" ", 1)[-1] if kind == 1 else None
            delta = {0: -0.35, 1: 0.22, 2: -0.2, 3: 0.05}[kind]
            doc: dict[str, Any] = {
                "id": f"{adapter}-{i:04d}",
                "adapter": adapter,
                "prompt": prompt,
                "response": response,
                "entropy_before": 2.0,
                "entropy_after": round(2.0 + delta, 2),
            }
            if baseline is not None:
                doc["baseline"] = baseline
            lines.append(orjson.dumps(doc))
    lines.insert(10, b'{"id": "bad-1", "prompt": "no response field", "entropy_delta": -0.5}')
    lines.insert(
        40,
        b'{"id": "bad-2", "adapter": "../etc/passwd", "prompt": "p", "response": "r", "entropy_delta": 1}',
    )
    lines.insert(70, b"this line is not JSON")
    return lines


def _expected_versions(lines: list[bytes], window: int) -> dict[str, int]:
    qualifying: Counter[str] = Counter()
    for line in lines:
        try:
            doc = orjson.loads(line)
            delta = doc["entropy_after"] - doc["entropy_before"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        if abs(delta) > 0.15 + 1e-9 and "/" not in doc.get("adapter", ""):
            qualifying[doc["adapter"]] += 1
    return {adapter: n // window for adapter, n in qualifying.items()}


def _worker(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "lorastream", *args],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def run_demo(settings: Settings, console: Console, timeout: float = 600.0) -> None:
    from transformers.utils import logging as hf_logging

    from lorastream.admin import create_topics, topic_specs
    from lorastream.broker import LocalBroker, kafka_answers
    from lorastream.follow import follow
    from lorastream.produce import produce_file, validate_file
    from trainer.history import load_lineages

    hf_logging.disable_progress_bar()
    console.rule("[bold]1. Kafka")
    port = int(settings.bootstrap_servers.split(",")[0].rsplit(":", 1)[-1])
    broker = LocalBroker(settings.home / "broker", port=port, controller_port=port + 1)
    started_broker = not kafka_answers(settings.bootstrap_servers)
    if started_broker:
        with console.status(
            "starting the local KRaft broker (the first start fetches jars from Maven Central)…"
        ):
            t0 = time.monotonic()
            bootstrap = broker.start()
        console.print(f"local broker started at {bootstrap} ({time.monotonic() - t0:.1f}s)")
    else:
        bootstrap = settings.bootstrap_servers
        console.print(f"using the Kafka broker that answers at {bootstrap}")

    prefix = settings.topic_prefix or f"demo-{uuid.uuid4().hex[:6]}."
    run_dir = settings.home / "demo" / prefix.rstrip(".")
    run_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir = (settings.adapter_dir / prefix.rstrip(".")).resolve()
    settings = settings.model_copy(update={"topic_prefix": prefix, "bootstrap_servers": bootstrap})
    topics = settings.topics
    asyncio.run(create_topics(bootstrap, topic_specs(topics, 3, 1)))
    console.print(f"topics created with prefix [bold]{prefix}[/]")

    console.rule("[bold]2. Produce generation results")
    data = run_dir / "generation-results.jsonl"
    lines = demo_records()
    data.write_bytes(b"\n".join(lines) + b"\n")
    report = validate_file(data)
    for error in report.bad:
        console.print(
            f"  {error.at_line_of(data.name)}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    sent = asyncio.run(produce_file(data, bootstrap, topics.generation_results))
    console.print(f"produced {sent} results; {len(report.bad)} bad lines reported and skipped")
    bad_raw = [line for line in lines if line.startswith(b'{"id": "bad-2"')]
    asyncio.run(_produce_raw(bootstrap, topics.generation_results, bad_raw))
    console.print("and one bad record straight to Kafka, to show the dead-letter topic")

    console.rule("[bold]3. Score and train")
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "LORASTREAM_TOPIC_PREFIX": prefix,
        "LORASTREAM_ADAPTER_DIR": str(adapter_dir),
        "LORASTREAM_HOME": str(settings.home),
    }
    scorer = _worker(["score"], env, run_dir / "score.log")
    trainer = _worker(["train"], env, run_dir / "train.log")
    expected = _expected_versions(lines, settings.window_size)
    total = sum(expected.values())
    console.print(
        f"expecting {', '.join(f'{a} v1–v{n}' for a, n in sorted(expected.items()))}; "
        f"logs in {run_dir}"
    )
    updates: list[AdapterUpdate] = []

    def show(update: AdapterUpdate, _raw: bytes) -> None:
        updates.append(update)
        w = update.window
        console.print(
            f"  announced [bold]{update.adapter} v{update.version}[/]  loss {update.train_loss:.4f}  "
            f"window {w.topic}[{w.partition}]@{w.first_offset}..{w.last_offset}  sha256 {update.sha256[:12]}"
        )

    try:
        asyncio.run(
            follow(
                bootstrap,
                topics.adapter_updates,
                show,
                from_beginning=True,
                count=total,
                timeout=timeout,
            )
        )
        if len(updates) < total:
            raise DemoError(
                f"only {len(updates)} of {total} versions within {timeout:.0f}s; "
                f"see {run_dir / 'train.log'} and {run_dir / 'score.log'}"
            )
        console.rule("[bold]4. Lineage")
        lineages = asyncio.run(load_lineages(bootstrap, topics.adapter_updates, topics.quarantine))
        table = Table("adapter", "version", "window", "loss", "uri")
        for adapter in sorted(lineages):
            for u in lineages[adapter].updates:
                table.add_row(
                    adapter,
                    str(u.version),
                    f"{u.window.first_offset}..{u.window.last_offset}",
                    f"{u.train_loss:.4f}",
                    u.uri,
                )
        console.print(table)
        dead = asyncio.run(_count(bootstrap, topics.dead_letters))
        console.print(f"dead letters: {dead} (topic {topics.dead_letters})")
        console.rule("[bold]5. Load with PEFT, as a serving system would")
        _load_newest(settings, lineages, console)
    finally:
        for proc in (trainer, scorer):
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in (trainer, scorer):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        if started_broker:
            broker.stop()
            console.print("broker stopped")
    console.rule("[bold green]done")


async def _produce_raw(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, key=b"oops", value=value)
    finally:
        await producer.stop()


async def _count(bootstrap: str, topic: str) -> int:
    from trainer.history import read_committed_topic

    records, _ = await read_committed_topic(bootstrap, topic)
    return len(records)


def _load_newest(settings: Settings, lineages: dict[str, Any], console: Console) -> None:
    """Load each adapter's newest version as a serving system would, and show what it learned:
    the loss on the adapter's own prompt → response pairs, without and with the adapter."""
    from urllib.parse import urlparse

    import torch
    from peft import PeftModel

    from lorastream.stages import base_model_of
    from trainer.lora import IGNORE, build_batch
    from trainer.model import load_base_model

    base_dir, base_name = base_model_of(settings)
    for adapter in sorted(lineages):
        latest = lineages[adapter].latest
        if latest is None:
            continue
        base = load_base_model(base_dir, torch.device("cpu"), base_name)
        model = PeftModel.from_pretrained(base.model, Path(urlparse(latest.uri).path))
        ids, mask, labels = build_batch(base.tokenizer, TASKS[adapter], 512)
        with torch.no_grad():
            tuned = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
            with model.disable_adapter():
                plain = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        tokens = int((labels != IGNORE).sum())
        console.print(
            f"{adapter} v{latest.version}: PeftModel.from_pretrained OK ({lora} LoRA parameters); "
            f"loss on its {len(TASKS[adapter])} pairs ({tokens} response tokens): "
            f"base {plain:.4f} → with the adapter {tuned:.4f}",
            highlight=False,
        )
