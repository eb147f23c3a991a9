"""``lorastream demo``, the README's first command: what a first run shows, and what it leaves.

The demo runs as a subprocess against the session's broker, once as a user runs it
and once with ``--keep``. Each run takes about 20 s on two cores.
"""

from __future__ import annotations

import asyncio
import difflib
import os
import re
import struct
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from lorastream.demo import BAD_LINES, TASKS, TRAINING, demo_records
from lorastream.ops.admin import delete_topics, list_topics
from schemas import KafkaPosition, Topics
from streams.scoring import Thresholds, process
from tests.kafka_util import LORASTREAM
from trainer.window import held_out

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _demo(kafka_bootstrap: str, tmp_path: Path, prefix: str, *flags: str) -> str:
    (tmp_path / "tmp").mkdir()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "LORASTREAM_TOPIC_PREFIX": prefix,
        "LORASTREAM_HOME": str(tmp_path / "home"),
        "LORASTREAM_ADAPTER_DIR": str(tmp_path / "adapters"),
        "TMPDIR": str(tmp_path / "tmp"),
        "COLUMNS": "200",
    }
    done = subprocess.run(
        [LORASTREAM, "demo", "--timeout", "200", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def _topics(bootstrap: str, prefix: str) -> set[str]:
    return {topic.name for topic in asyncio.run(list_topics(bootstrap, prefix))}


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
    kafka_bootstrap: str, tmp_path: Path, prefix: str
) -> None:
    output = _demo(kafka_bootstrap, tmp_path, prefix)
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
    assert struct.unpack(">II", head[16:24]) == (500 * len(TASKS), 420)  # a panel each
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
def test_demo_keep_leaves_topics_adapters_and_logs_and_says_where(
    kafka_bootstrap: str, tmp_path: Path, prefix: str
) -> None:
    try:
        output = _demo(kafka_bootstrap, tmp_path, prefix, "--keep")
        name = prefix.rstrip(".")
        assert set(Topics.named(prefix).all()) <= _topics(kafka_bootstrap, prefix)
        adapters = tmp_path / "adapters" / name
        for adapter in TASKS:
            files = list((adapters / adapter).glob("v*/adapter_model.safetensors"))
            assert len(files) == TRAINING.versions, adapter
        kept = tmp_path / "home" / "demo" / name
        assert {p.name for p in kept.iterdir()} >= {
            "generation-results.jsonl",
            "scorer.log",
            "trainer.log",
            "loss.png",
        }
        assert f"adapters  {adapters}/" in output
        assert f"lorastream topics delete --prefix {prefix} --yes" in output
        # Producers start only once each new partition is served by its leader.
        logs = output + (kept / "scorer.log").read_text() + (kept / "trainer.log").read_text()
        assert "NotLeaderForPartition" not in logs
    finally:
        asyncio.run(delete_topics(kafka_bootstrap, sorted(_topics(kafka_bootstrap, prefix))))
