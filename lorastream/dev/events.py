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


def learning_event(adapter: str, n: int) -> LearningEvent:
    """Event ``n`` of ``adapter`` (id ``<adapter>-<n:03d>``): pair ``n % 4``, a breakthrough."""
    prompt, response = PAIRS[n % len(PAIRS)]
    return LearningEvent(
        id=f"{adapter}-{n:03d}",
        adapter=adapter,
        prompt=prompt,
        response=response,
        rouge_score=0.9,
        entropy_delta=-0.3,
        is_breakthrough=True,
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        source=SourcePosition(topic="generation-results", partition=0, offset=n),
    )
