"""What one input record becomes on the output topics; the agent's core, with no I/O.

:func:`route` never raises. A record that breaks the contract, one whose
scoring raised (an exception the contract did not foresee: a bug, or a gap
in the contract), and a LearningEvent too large for Kafka all become a
bounded :class:`~schemas.DeadLetter`; so for every record the loop has one
record to write, or a definite nothing (a valid result that did not qualify).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

from schemas import DeadLetter, GenerationResult, KafkaPosition, LearningEvent, encode
from schemas.limits import MAX_OUTPUT_BYTES, clip, record_size
from streams.scoring import Outcome, Thresholds, process

__all__ = ["EventRecord", "Output", "Routing", "SourceRecord", "route"]


@dataclass(frozen=True)
class SourceRecord:
    """One GenerationResult record as the agent read it."""

    key: bytes | None
    value: bytes | None
    position: KafkaPosition
    timestamp_ms: int | None

    def dead_letter(self, reason: str, *, limit: int = MAX_OUTPUT_BYTES) -> DeadLetter:
        """Its dead letter for a ``reason`` other than a broken contract; the whole is blamed."""
        return DeadLetter.of(
            self.key,
            self.value,
            self.position,
            self.timestamp_ms,
            reason=reason,
            error_type=GenerationResult.__name__,
            limit=limit,
        )


@dataclass(frozen=True)
class EventRecord:
    """An encoded LearningEvent, keyed by its adapter name."""

    key: bytes
    value: bytes
    event: LearningEvent


Output = EventRecord | DeadLetter


@dataclass(frozen=True)
class Routing:
    """What to write for one record, and why.

    ``output`` is None for a valid result that did not qualify. ``outcome`` is
    None when scoring raised; ``failure`` then says what was raised and where,
    in one line, and ``output`` is the record's dead letter.
    """

    output: Output | None
    outcome: Outcome | None = None
    failure: str | None = None


def route(record: SourceRecord, thresholds: Thresholds) -> Routing:
    """Score one record into what should be written for it; never raises."""
    try:
        outcome = process(record.value, record.position, record.timestamp_ms, thresholds)
        if outcome.error is not None:
            letter = DeadLetter.refusing(
                outcome.error, record.key, record.value, record.position, record.timestamp_ms
            )
            return Routing(letter, outcome)
        if outcome.event is None:
            return Routing(None, outcome)
        key, value = outcome.event.adapter.encode(), encode(outcome.event)
        size = record_size(key, value)
        if size > MAX_OUTPUT_BYTES:
            # MAX_RESULT_BYTES keeps every event far below this; if that reasoning ever
            # breaks, the record is still accounted for rather than refused by Kafka.
            reason = (
                f"the LearningEvent of the GenerationResult at {record.position} would be "
                f"{size} bytes, more than the {MAX_OUTPUT_BYTES} that lorastream writes"
            )
            return Routing(record.dead_letter(reason), outcome)
        return Routing(EventRecord(key, value, outcome.event), outcome)
    except Exception as exc:
        failure = f"unexpected {type(exc).__name__}: {clip(str(exc), 500)} ({_where(exc)})"
        reason = (
            f"the GenerationResult at {record.position} could not be scored: {failure}. "
            "This is a bug in lorastream or a gap in its contract; please report it"
        )
        return Routing(record.dead_letter(reason), failure=failure)


def _where(exc: BaseException) -> str:
    """``package/module.py:line`` of the innermost frame that raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "no traceback"
    frame = frames[-1]
    path = Path(frame.filename)
    return f"{path.parent.name}/{path.name}:{frame.lineno}"
