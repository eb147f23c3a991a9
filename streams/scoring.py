"""The scoring rule, GenerationResult -> LearningEvent, with no I/O in it.

The rule, from the design contract (thresholds configurable, these the defaults):

- ``rouge_score`` is the ROUGE-L F-measure of ``response`` against ``baseline``
  as the ``rouge-score`` package computes it with its stemmer on; 0.0 without
  a baseline.
- breakthrough  <=>  ``rouge_score > 0.7`` and ``entropy_delta < -0.1``.
- the event qualifies  <=>  breakthrough, or ``|entropy_delta| > 0.15``.

Only qualifying events become LearningEvents. ``process`` turns one Kafka
record into exactly one :class:`Outcome` and never raises on bad input: the
Faust agent and the replay job share it, so the rule lives in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from schemas import (
    GenerationResult,
    KafkaPosition,
    LearningEvent,
    SchemaError,
    SourcePosition,
    decode,
)
from streams.rouge import rouge_l

__all__ = ["Outcome", "Score", "Thresholds", "classify", "process", "score"]


@dataclass(frozen=True)
class Thresholds:
    """The scoring rule's thresholds; every comparison is strict."""

    rouge: float = 0.7
    breakthrough_entropy: float = -0.1
    qualify_entropy: float = 0.15

    def __post_init__(self) -> None:
        for name in ("rouge", "breakthrough_entropy", "qualify_entropy"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"threshold {name} must be a finite number, not {value!r}")
        if not 0.0 <= self.rouge <= 1.0:
            raise ValueError(f"threshold rouge must lie in [0, 1], not {self.rouge}")
        if self.qualify_entropy < 0:
            raise ValueError(
                f"threshold qualify_entropy bounds |entropy_delta|, so it cannot be negative "
                f"({self.qualify_entropy})"
            )


@dataclass(frozen=True)
class Score:
    rouge_score: float
    entropy_delta: float
    is_breakthrough: bool
    qualifies: bool


def classify(rouge_score: float, entropy_delta: float, thresholds: Thresholds) -> tuple[bool, bool]:
    """``(is_breakthrough, qualifies)`` for one scored result."""
    breakthrough = (
        rouge_score > thresholds.rouge and entropy_delta < thresholds.breakthrough_entropy
    )
    return breakthrough, breakthrough or abs(entropy_delta) > thresholds.qualify_entropy


def score(result: GenerationResult, thresholds: Thresholds) -> Score:
    rouge = rouge_l(result.baseline, result.response) if result.baseline is not None else 0.0
    delta = result.effective_entropy_delta
    breakthrough, qualifies = classify(rouge, delta, thresholds)
    return Score(rouge, delta, breakthrough, qualifies)


@dataclass(frozen=True)
class Outcome:
    """What one input record became: a LearningEvent, nothing, or a dead letter.

    ``event`` is set when the result qualified; ``error`` when the record
    broke the contract (then ``event`` is None and the record goes to the
    dead-letter topic with the error as its reason). Neither means the result
    was valid and did not qualify.
    """

    event: LearningEvent | None = None
    score: Score | None = None
    error: SchemaError | None = None


def process(
    value: bytes | None,
    position: KafkaPosition,
    timestamp_ms: int | None,
    thresholds: Thresholds,
) -> Outcome:
    """Score one raw GenerationResult record; never raises on bad input."""
    try:
        result = decode(value, GenerationResult, position=position)
    except SchemaError as exc:
        return Outcome(error=exc)
    result_score = score(result, thresholds)
    if not result_score.qualifies:
        return Outcome(score=result_score)
    if result.created_at is not None:
        timestamp = result.created_at
    elif timestamp_ms is not None and timestamp_ms >= 0:
        timestamp = datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
    else:
        timestamp = datetime.now(tz=UTC)
    event = LearningEvent(
        id=result.id,
        adapter=result.adapter,
        prompt=result.prompt,
        response=result.response,
        baseline=result.baseline,
        rouge_score=result_score.rouge_score,
        entropy_delta=result_score.entropy_delta,
        is_breakthrough=result_score.is_breakthrough,
        timestamp=timestamp,
        source=SourcePosition(
            topic=position.topic, partition=position.partition, offset=position.offset
        ),
        metadata=result.metadata,
    )
    return Outcome(event=event, score=result_score)
