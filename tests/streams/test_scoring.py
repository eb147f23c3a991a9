"""The scoring rule as tables of cases, boundaries included."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from rouge_score import rouge_scorer

from schemas import GenerationResult, KafkaPosition
from streams.scoring import Thresholds, classify, process, score

DEFAULT = Thresholds()
REFERENCE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
TEN = "cat dog sun red box pen cup hat map key"
SEVEN_OF_TEN = "cat dog sun red xxx pen yyy hat zzz key"  # LCS 7 of 10 on each side: F = 0.7


@pytest.mark.parametrize(
    ("rouge", "delta", "breakthrough", "qualifies"),
    [
        (0.71, -0.11, True, True),
        (0.7, -0.5, False, True),  # ROUGE exactly 0.7 is not above 0.7
        (0.7, -0.12, False, False),
        (0.7000001, -0.12, True, True),
        (0.9, -0.1, False, False),  # delta exactly -0.1 is not below -0.1
        (0.9, -0.1000001, True, True),
        (0.9, -0.12, True, True),  # a breakthrough qualifies though |delta| <= 0.15
        (0.0, 0.15, False, False),  # |delta| exactly 0.15 does not qualify
        (0.0, -0.15, False, False),
        (0.0, 0.1500001, False, True),
        (0.0, -0.16, False, True),
        (0.95, 0.5, False, True),  # rising entropy is never a breakthrough
        (1.0, 0.0, False, False),
        (0.0, 0.0, False, False),
    ],
)
def test_classify(rouge: float, delta: float, breakthrough: bool, qualifies: bool) -> None:
    assert classify(rouge, delta, DEFAULT) == (breakthrough, qualifies)


def test_thresholds_are_configurable() -> None:
    strict = Thresholds(rouge=0.9, breakthrough_entropy=-0.5, qualify_entropy=1.0)
    assert classify(0.8, -0.6, strict) == (False, False)
    assert classify(0.95, -0.6, strict) == (True, True)
    assert classify(0.0, 1.01, strict) == (False, True)


@pytest.mark.parametrize(
    "bad",
    [
        {"rouge": 1.5},
        {"rouge": float("nan")},
        {"qualify_entropy": -0.1},
        {"breakthrough_entropy": float("inf")},
    ],
)
def test_bad_thresholds_name_the_threshold(bad: dict[str, float]) -> None:
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        Thresholds(**bad)


def _result(**fields: Any) -> GenerationResult:
    return GenerationResult.model_validate({"id": "r", "prompt": "p", **fields})


@pytest.mark.parametrize(
    ("fields", "rouge", "delta", "breakthrough", "qualifies"),
    [
        pytest.param(
            {
                "response": "The cat sat on the mat.",
                "baseline": "The cat sat on the mat.",
                "entropy_delta": -0.2,
            },
            1.0,
            -0.2,
            True,
            True,
            id="identical-and-sharper",
        ),
        pytest.param(
            {"response": "Paris is lovely.", "entropy_delta": -0.5},
            0.0,
            -0.5,
            False,
            True,
            id="no-baseline-scores-0",
        ),
        pytest.param(
            {"response": "Paris is lovely.", "entropy_delta": -0.12},
            0.0,
            -0.12,
            False,
            False,
            id="no-baseline-small-delta",
        ),
        pytest.param(
            {"response": SEVEN_OF_TEN, "baseline": TEN, "entropy_delta": -0.5},
            0.7,
            -0.5,
            False,
            True,
            id="rouge-exactly-0.7-from-text",
        ),
        pytest.param(
            {"response": SEVEN_OF_TEN, "baseline": TEN, "entropy_delta": -0.12},
            0.7,
            -0.12,
            False,
            False,
            id="rouge-exactly-0.7-small-delta",
        ),
        pytest.param(
            {"response": TEN, "baseline": TEN, "entropy_before": 2.3, "entropy_after": 2.15},
            1.0,
            -0.15,
            True,
            True,
            id="delta-from-pair",
        ),
        pytest.param(
            {"response": "x", "entropy_before": 2.3, "entropy_after": 2.15},
            0.0,
            -0.15,
            False,
            False,
            id="pair-gives-exactly-minus-0.15",
        ),
        pytest.param(
            {"response": "x", "entropy_before": 2.3, "entropy_after": 2.45},
            0.0,
            0.15,
            False,
            False,
            id="pair-gives-exactly-plus-0.15",
        ),
        pytest.param(
            {"response": "x", "entropy_before": 1.0, "entropy_after": 0.9},
            0.0,
            -0.1,
            False,
            False,
            id="pair-gives-exactly-minus-0.1",
        ),
        pytest.param(
            {"response": "x", "entropy_delta": -0.15, "entropy_before": 0.0, "entropy_after": 9.0},
            0.0,
            -0.15,
            False,
            False,
            id="given-delta-wins-over-pair",
        ),
        pytest.param(
            {
                "response": "Привет, как дела?",
                "baseline": "Привет, как дела?",
                "entropy_delta": -0.2,
            },
            0.0,
            -0.2,
            False,
            True,
            id="identical-cyrillic-scores-0-as-rouge-score-does",
        ),
        pytest.param(
            {"response": "café au lait", "baseline": "Café au lait!", "entropy_delta": -0.2},
            1.0,
            -0.2,
            True,
            True,
            id="accents-drop-the-letter-on-both-sides",
        ),
        pytest.param(
            {
                "response": "He was running quickly",
                "baseline": "he runs quickly",
                "entropy_delta": 0.3,
            },
            None,
            0.3,
            False,
            True,
            id="stemmer-on",
        ),
    ],
)
def test_score(
    fields: dict[str, Any], rouge: float | None, delta: float, breakthrough: bool, qualifies: bool
) -> None:
    result = _result(**fields)
    scored = score(result, DEFAULT)
    if result.baseline is not None:
        expected = REFERENCE.score(result.baseline, result.response)["rougeL"].fmeasure
        assert scored.rouge_score == expected
    if rouge is not None:
        assert scored.rouge_score == rouge
    assert scored.entropy_delta == delta
    assert (scored.is_breakthrough, scored.qualifies) == (breakthrough, qualifies)


POSITION = KafkaPosition("generation-results", 3, 1234)


def test_process_builds_the_learning_event() -> None:
    raw = orjson.dumps(
        {
            "id": "r-9",
            "adapter": "tutor",
            "prompt": "2+2?",
            "response": "4",
            "baseline": "4",
            "entropy_delta": -0.4,
            "metadata": {"model": "m1"},
        }
    )
    outcome = process(raw, POSITION, 1_700_000_000_123, DEFAULT)
    assert outcome.error is None and outcome.event is not None
    event = outcome.event
    assert (event.id, event.adapter, event.prompt, event.response) == ("r-9", "tutor", "2+2?", "4")
    assert (event.rouge_score, event.entropy_delta, event.is_breakthrough) == (1.0, -0.4, True)
    assert (event.source.topic, event.source.partition, event.source.offset) == (
        "generation-results",
        3,
        1234,
    )
    assert event.timestamp == datetime.fromtimestamp(1_700_000_000.123, tz=UTC)
    assert event.metadata == {"model": "m1"}


def test_process_prefers_created_at_to_the_record_timestamp() -> None:
    raw = orjson.dumps(
        {
            "id": "r",
            "prompt": "p",
            "response": "r",
            "entropy_delta": 0.9,
            "created_at": "2026-01-31T12:00:00+02:00",
        }
    )
    outcome = process(raw, POSITION, 1_700_000_000_000, DEFAULT)
    assert outcome.event is not None
    assert outcome.event.timestamp == datetime(2026, 1, 31, 10, tzinfo=UTC)


def test_process_drops_nothing_silently() -> None:
    quiet = process(
        orjson.dumps({"id": "r", "prompt": "p", "response": "r", "entropy_delta": 0.01}),
        POSITION,
        0,
        DEFAULT,
    )
    assert quiet.event is None and quiet.error is None and quiet.score is not None
    bad = process(b'{"id": 1}', POSITION, 0, DEFAULT)
    assert bad.event is None and bad.error is not None
    assert "generation-results[3]@1234" in str(bad.error)
    assert process(None, POSITION, None, DEFAULT).error is not None
