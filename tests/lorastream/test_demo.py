"""``lorastream demo``, the README's first command: what a first run shows, what it makes
while it runs, and what it leaves.

The demo runs once for the whole module, as a user runs it (without ``--keep``), as a
subprocess against the session's broker; it takes a minute or two on two cores. When it
starts its fifth stage every version is announced and nothing is cleaned up yet: there
the fixture stops the demo (SIGSTOP), records the topics, adapters, data and logs it
made, and lets it go on (SIGCONT), so that the tests see both what a run makes and that
none of it is left. ``--keep`` changes only where those go and the clean-up: its test
runs the demo's own steps and clean-up in-process, without the workers.
"""

from __future__ import annotations

import asyncio
import difflib
import io
import os
import re
import signal
import struct
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from lorastream.demo.cleanup import clean_up
from lorastream.demo.data import BAD_LINES, TASKS, TRAINING, demo_records
from lorastream.demo.run import Run
from lorastream.demo.steps import prepare_kafka, produce
from lorastream.dev.workers import LORASTREAM
from lorastream.ops.admin import delete_topics, list_topics
from lorastream.settings import load_settings
from schemas import KafkaPosition, Topics
from streams.scoring import Thresholds, process
from trainer.kafka import KafkaConnection
from trainer.window import held_out

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The rule the demo prints as the picture's stage begins: every version is announced, the
# run's topics, adapters, data and logs all exist, and the offline fine-tune takes seconds.
ALL_MADE = "5. What the adapters learned"


@dataclass(frozen=True)
class Made:
    """What a demo run had made when it reached :data:`ALL_MADE`."""

    topics: set[str]  # under the run's prefix
    adapter_files: Counter[str]  # adapter_model.safetensors per adapter
    files: set[str]  # names in the run's temporary directory
    logs: str  # the scorer's and the trainer's logs


@dataclass(frozen=True)
class DemoRun:
    """One ``lorastream demo``: its output, and what it had made on the way."""

    output: str
    tmp_path: Path  # its TMPDIR (tmp/), LORASTREAM_HOME (home/) and LORASTREAM_ADAPTER_DIR
    prefix: str
    made: Made


def _topics(bootstrap: str, prefix: str) -> set[str]:
    return {topic.name for topic in asyncio.run(list_topics(KafkaConnection(bootstrap), prefix))}


def _made(bootstrap: str, tmp_path: Path, prefix: str) -> Made:
    """What the paused demo has made: its topics, adapters, data and logs."""
    (work,) = (tmp_path / "tmp").glob("lorastream-*")
    return Made(
        topics=_topics(bootstrap, prefix),
        adapter_files=Counter(
            path.parent.parent.name
            for path in (work / "adapters").glob("*/v*/adapter_model.safetensors")
        ),
        files={path.name for path in work.iterdir()},
        logs=(work / "scorer.log").read_text() + (work / "trainer.log").read_text(),
    )


@pytest.fixture(scope="module")
def demo(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    tmp_path = tmp_path_factory.mktemp("demo")
    prefix = f"t{uuid.uuid4().hex[:10]}."
    (tmp_path / "tmp").mkdir()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "LORASTREAM_TOPIC_PREFIX": prefix,
        "LORASTREAM_HOME": str(tmp_path / "home"),
        "LORASTREAM_ADAPTER_DIR": str(tmp_path / "adapters"),
        "TMPDIR": str(tmp_path / "tmp"),
        "COLUMNS": "200",
        "PYTHONUNBUFFERED": "1",  # each line as it is printed: the fixture acts on one
    }
    stderr = tmp_path / "stderr.txt"
    made: Made | None = None
    with stderr.open("w") as err:
        done = subprocess.Popen(
            [LORASTREAM, "demo", "--timeout", "200"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    watchdog = threading.Timer(280, done.kill)
    watchdog.start()
    stdout = []
    try:
        assert done.stdout is not None
        for line in done.stdout:
            stdout.append(line)
            if ALL_MADE in line and made is None:
                done.send_signal(signal.SIGSTOP)  # nothing moves while it is looked at
                try:
                    made = _made(kafka_bootstrap, tmp_path, prefix)
                finally:
                    done.send_signal(signal.SIGCONT)
        done.wait()
    finally:
        watchdog.cancel()
        if done.poll() is None:
            done.kill()
            done.wait()
    output = "".join(stdout) + stderr.read_text()
    assert done.returncode == 0, output
    assert made is not None, output
    yield DemoRun(output, tmp_path, prefix, made)


def test_demo_data_gives_every_adapter_balanced_full_windows() -> None:
    """No broker: the scorer's own rule keeps exactly the planned events, the trainer's
    hold-out takes a tenth of them and leaves full windows, every window holds each pair
    equally often, and the bad lines sit where the other test expects them."""
    lines = demo_records()
    assert {n: lines[n - 1] for n in BAD_LINES} == BAD_LINES
    kept: dict[str, list[tuple[str, str]]] = {}
    held: dict[str, list[tuple[str, str]]] = {}
    for line in lines:
        event = process(line, KafkaPosition("t", 0, 0), None, Thresholds()).event
        if event is not None:
            into = held if held_out(event.id, TRAINING.eval_fraction) else kept
            into.setdefault(event.adapter, []).append((event.prompt, event.response))
    assert sorted(kept) == sorted(held) == sorted(TASKS)
    w = TRAINING.window_size
    for adapter, events in kept.items():
        assert len(events) == w * TRAINING.versions
        for start in range(0, len(events), w):
            counts = Counter(events[start : start + w])
            assert set(counts) == set(TASKS[adapter])
            assert len(set(counts.values())) == 1, (adapter, start, counts)
        share = len(held[adapter]) / (len(held[adapter]) + len(events))
        assert 0.05 < share < 0.2, (adapter, share)
        assert set(held[adapter]) == set(TASKS[adapter])


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_demo_shows_reasons_loss_and_learning_then_leaves_no_topic_or_file(
    kafka_bootstrap: str, demo: DemoRun
) -> None:
    output, tmp_path, prefix = demo.output, demo.tmp_path, demo.prefix
    assert output.startswith("lorastream demo"), output  # said at once, before any heavy import
    assert f"using the Kafka broker that answers at {kafka_bootstrap}" in output
    # The bad lines by number, and each dead letter with its reason and its position.
    assert re.findall(r"generation-results\.jsonl:(\d+): invalid", output) == ["11", "41", "71"]
    source = re.escape(f"{prefix}generation-results")
    assert re.search(
        rf"^  {source}\[\d\]@\d+: invalid GenerationResult: adapter: '\.\./etc/passwd' does not match",
        output,
        re.M,
    ), output
    assert re.search(
        rf"^  {source}\[\d\]@\d+: invalid GenerationResult: baselin: is not a field", output, re.M
    ), output
    # The settings used, by variable.
    for variable, value in TRAINING.environment().items():
        if variable != "LORASTREAM_LORA_DROPOUT":
            assert f"{variable}={value}" in output
    # One line per adapter describes the picture; the loss ends far below chance (ln 384).
    assert "ln 384 = 5.95" in output
    curves = {
        adapter: (float(first), float(last))
        for adapter, first, last in re.findall(
            rf"^  (\S+): ([\d.]+) → ([\d.]+) over {TRAINING.versions} versions", output, re.M
        )
    }
    assert sorted(curves) == sorted(TASKS), output
    for adapter, (first, last) in curves.items():
        assert first > 5.5, (adapter, first)  # v1 is the random base model: chance
        assert last < 1.0, (adapter, last)  # today's demo ended at 5.89
    png = Path(re.search(r"loss per version: (\S+\.png)", output)[1])  # type: ignore[index]
    assert png.is_relative_to(tmp_path / "home"), png
    head = png.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", head
    # a panel each, over a second row of the held-out loss per segment (#23)
    assert struct.unpack(">II", head[16:24]) == (500 * len(TASKS), 840)
    # Every version evaluated on held-out events: from the base model's loss down to the
    # newest version's, beside an offline fine-tune on the same events.
    held = re.findall(
        r"^    held-out \((\d+) events\): base ([\d.]+) → v(\d+) ([\d.]+); an offline "
        r"fine-tune on the same (\d+) events: ([\d.]+) after one epoch .*, ([\d.]+) after 3$",
        output,
        re.M,
    )
    assert len(held) == len(TASKS), output
    for events, base, version, loss, trained, one_epoch, three in held:
        assert int(events) > 10 and int(version) == TRAINING.versions
        assert int(trained) == TRAINING.versions * TRAINING.window_size
        assert float(base) > 5.5 and float(loss) < 1.0
        assert float(three) <= float(one_epoch) < 1.0
    # Loaded from each announcement; the adapter's greedy generation gives back what it was
    # trained on, the base model's is byte noise.
    for adapter, pairs in TASKS.items():
        prompt, response = pairs[0]
        match = re.search(
            rf"^  loss on its 2 pairs .*: base ([\d.]+) → with the adapter ([\d.]+).*\n"
            rf"  greedy generation for {re.escape(repr(prompt))} .*\n"
            rf"    base model +(.*)\n"
            rf"    with the adapter +(.*?)   ←",
            output,
            re.M,
        )
        assert match, (adapter, output)
        assert float(match[1]) > 5.5 and float(match[2]) < 1.0, match[0]
        assert difflib.SequenceMatcher(None, match[4], repr(response)).ratio() > 0.8, match[0]
        assert difflib.SequenceMatcher(None, match[3], repr(response)).ratio() < 0.5, match[0]
    # Nothing left behind but the picture: no topic under the prefix, no temporary
    # directory, no adapter, no Faust state.
    assert _topics(kafka_bootstrap, prefix) == set()
    assert not list((tmp_path / "tmp").glob("lorastream-*")), list((tmp_path / "tmp").iterdir())
    assert not list(tmp_path.rglob("adapter_model.safetensors"))
    assert not list((tmp_path / "home" / "faust").glob(f"{prefix}*"))
    assert [p.name for p in png.parent.iterdir()] == ["loss.png"]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_demo_makes_topics_adapters_data_and_logs_while_it_runs(demo: DemoRun) -> None:
    """What ``--keep`` would leave exists while the run goes on (and is gone after it:
    the test above)."""
    assert set(Topics.named(demo.prefix).all()) <= demo.made.topics
    assert demo.made.adapter_files == Counter(dict.fromkeys(TASKS, TRAINING.versions))
    assert demo.made.files >= {"generation-results.jsonl", "scorer.log", "trainer.log"}
    png = demo.tmp_path / "home" / "demo" / demo.prefix.rstrip(".") / "loss.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    # Producers start only once each new partition is served by its leader.
    assert "NotLeaderForPartition" not in demo.output + demo.made.logs


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_demo_keep_leaves_topics_adapters_and_logs_and_says_where(
    kafka_bootstrap: str, tmp_path: Path, prefix: str
) -> None:
    """With ``--keep`` the run's files go under LORASTREAM_HOME/demo/<name> and its
    adapters under LORASTREAM_ADAPTER_DIR/<name>, and the clean-up leaves them, and the
    topics, and says where they are: the demo's own steps, without the workers."""
    settings = load_settings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=prefix,
        home=tmp_path / "home",
        adapter_dir=str(tmp_path / "adapters"),
    )
    printed = io.StringIO()
    run = Run(settings, Console(file=printed, width=200), timeout=60.0, keep=True)
    try:
        name = prefix.rstrip(".")
        adapters = tmp_path / "adapters" / name
        kept = tmp_path / "home" / "demo" / name
        assert (run.adapters, run.logs, run.results, run.work) == (adapters, kept, kept, None)
        prepare_kafka(run)
        produce(run)
        trained = adapters / "math-tutor" / "v1" / "adapter_model.safetensors"
        trained.parent.mkdir(parents=True)
        trained.write_bytes(b"weights")  # what the trainer writes
        clean_up(run)
        output = printed.getvalue()
        assert set(Topics.named(prefix).all()) <= _topics(kafka_bootstrap, prefix)
        assert trained.read_bytes() == b"weights"
        assert (kept / "generation-results.jsonl").is_file()
        assert f"adapters  {adapters}/" in output
        assert f"lorastream topics delete --prefix {prefix} --yes" in output
    finally:
        asyncio.run(
            delete_topics(
                KafkaConnection(kafka_bootstrap), sorted(_topics(kafka_bootstrap, prefix))
            )
        )
