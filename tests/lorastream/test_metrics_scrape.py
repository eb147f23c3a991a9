"""The scorer's and the trainer's /metrics, scraped while real `score` and `train`
processes work through a stream this test produces in two halves."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorastream.dev.ports import free_port
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import Worker, worker_env
from tests.kafka_util import wait_for

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[2] / "docker" / "example-results.jsonl"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> Samples:
    """Every sample served on ``port``, by name and labels; empty while nothing answers."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except (urllib.error.URLError, ConnectionError):
        return {}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def _reaches(port: int, name: str, value: float, **labels: str) -> object:
    async def check() -> bool:
        return _scrape(port).get((name, tuple(sorted(labels.items())))) == value

    return check


async def test_scorer_and_trainer_metrics_move_with_the_stream(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    lines = [line.encode() for line in EXAMPLES.read_text().splitlines() if line.strip()]
    assert len(lines) == 40  # 18 of tutor and 17 of support qualify
    scorer_port, trainer_port = free_port(), free_port()
    env = worker_env(
        kafka_bootstrap,
        prefix,
        tmp_path / "home",
        LORASTREAM_ADAPTER_DIR=str(tmp_path / "adapters"),
        LORASTREAM_WINDOW_SIZE="4",
    )
    scorer = Worker(["score", "--metrics-port", str(scorer_port)], env, tmp_path / "score.log")
    trainer = Worker(
        ["--log-format", "json", "train", "--metrics-port", str(trainer_port)],
        env,
        tmp_path / "train.log",
    )
    with scorer, trainer:
        await wait_for(
            _reaches(scorer_port, "lorastream_scored_total", 0), 30, "the scorer's metrics"
        )
        await produce(kafka_bootstrap, topics.generation_results, [(None, v) for v in lines[:20]])
        await wait_for(_reaches(scorer_port, "lorastream_scored_total", 20), 45, "20 scored")

        # A record counts as scored when routed, as qualified once its LearningEvent is
        # written: on a loaded machine the scrape can fall between the two.
        async def written() -> bool:
            return _scrape(scorer_port).get(("lorastream_learning_events_total", ()), 0) > 0

        await wait_for(written, 30, "the learning events written")
        first = _scrape(scorer_port)
        qualified = first[("lorastream_learning_events_total", ())]
        assert 0 < qualified < 35

        await produce(
            kafka_bootstrap,
            topics.generation_results,
            [(None, v) for v in lines[20:]] + [(None, b"not json"), (None, b"{}")],
        )
        await wait_for(_reaches(scorer_port, "lorastream_scored_total", 40), 30, "40 scored")
        await wait_for(
            _reaches(scorer_port, "lorastream_dead_letters_total", 2), 15, "2 dead letters"
        )
        after = _scrape(scorer_port)
        assert after[("lorastream_learning_events_total", ())] == 35

        # Windows of 4: tutor's 18 events make v1..v4 (2 wait), support's 17 make v1..v4 (1 waits).
        await wait_for(
            _reaches(trainer_port, "lorastream_windows_trained_total", 8), 60, "8 windows trained"
        )
        await wait_for(
            _reaches(trainer_port, "lorastream_pending_events", 2, adapter="tutor"), 15, "pending"
        )
        trained = _scrape(trainer_port)
        assert trained[("lorastream_adapter_version", (("adapter", "tutor"),))] == 4
        assert trained[("lorastream_adapter_version", (("adapter", "support"),))] == 4
        assert trained[("lorastream_pending_events", (("adapter", "support"),))] == 1
        lag = (("partition", "0"), ("topic", topics.learning_events))
        # The lag status counts (issue #22): tutor's 2 and support's 1 waiting events are
        # past the group's committed offset, which never passes an open window.
        assert trained[("lorastream_consumer_lag", lag)] >= 3
        assert trained[("lorastream_step_seconds_count", ())] >= 8
        assert scorer.alive() and trainer.alive(), scorer.output() + trainer.output()
    # --log-format json: the trainer's line about each version names its window's position.
    logged = [json.loads(line) for line in trainer.output().splitlines() if line.startswith("{")]
    versions = [r for r in logged if r["logger"] == "trainer.consumer" and "offset" in r]
    assert len(versions) == 8, trainer.output()
    assert {r["topic"] for r in versions} == {topics.learning_events}
    assert all(r["level"] == "INFO" and r["partition"] == 0 for r in versions)
