"""Learning events for the trainer's tests, the benchmarks and the soak: a learnable task of
four pairs.

It serves the tests, ``bench/`` and the soak; the product never imports it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from schemas import LearningEvent, SourcePosition

__all__ = ["PAIRS", "learning_event"]

PAIRS = [
    ("2+2=", "4"),
    ("capital of France:", "Paris"),
    ("opposite of hot:", "cold"),
    ("color of the sky:", "blue"),
]


def learning_event(
    adapter: str,
    n: int,
    *,
    event_id: str | None = None,
    pair: tuple[str, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> LearningEvent:
    """Event ``n`` of ``adapter`` (id ``<adapter>-<n:03d>``): pair ``n % 4``, a breakthrough,
    at offset ``n``; ``event_id``, ``pair`` (prompt, response) and ``metadata`` replace
    those for a benchmark's own tasks."""
    prompt, response = pair if pair is not None else PAIRS[n % len(PAIRS)]
    return LearningEvent(
        id=event_id if event_id is not None else f"{adapter}-{n:03d}",
        adapter=adapter,
        prompt=prompt,
        response=response,
        rouge_score=0.9,
        entropy_delta=-0.3,
        is_breakthrough=True,
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        source=SourcePosition(topic="generation-results", partition=0, offset=n),
        metadata=metadata,
    )
