"""Each adapter's evaluation set: its held-out events, which no window trains on.

A version's evaluation set is its parent's, plus the held-out events that
its window brought (:attr:`~trainer.window.Window.held_out`, in read order,
an id already in the set skipped), trimmed to ``size`` (:func:`extend_eval_set`).
It is written beside the version's weights (``eval-set.jsonl``, JSON only), so a
trainer that resumes from the version, or a replay that re-derives it with the
same window rule, continues from the same set.

Each held-out event belongs to a *segment* of the adapter's stream
(:func:`segment_of`): the producer's ``metadata.segment`` label when it gives
one, else the range of versions whose windows brought it. A version's loss per
segment is what the forgetting matrix (:mod:`trainer.forgetting`) is read from:
how well the adapter still does on what it learnt earlier.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import orjson

from schemas import LearningEvent, SegmentEval
from trainer.exceptions import AdapterStoreError
from trainer.window import PendingEvent

__all__ = [
    "UNLABELLED",
    "EvalExample",
    "decode_eval_set",
    "encode_eval_set",
    "extend_eval_set",
    "segment_losses",
    "segment_of",
    "trained_segment",
    "version_range",
]

# The segment of an example read from a file written before segments existed: its
# version-range segment cannot be recomputed from the file alone.
UNLABELLED = "unlabelled"
MAX_SEGMENT_LENGTH = 64


def version_range(version: int, windows: int) -> str:
    """The version-range segment of ``version``: ``v1-v8``, ``v9-v16`` ... for ``windows`` 8."""
    first = (version - 1) // windows * windows + 1
    return f"v{first}-v{first + windows - 1}"


def segment_of(event: LearningEvent, version: int, windows: int) -> str:
    """The segment of ``event``, brought (held out) or trained by ``version``: its
    ``metadata.segment`` when that is a non-empty string of at most 64 characters (the
    producer knows its tasks best), else :func:`version_range`."""
    label = (event.metadata or {}).get("segment")
    if isinstance(label, str) and 0 < len(label) <= MAX_SEGMENT_LENGTH:
        return label
    return version_range(version, windows)


def trained_segment(events: Sequence[LearningEvent], version: int, windows: int) -> str:
    """The segment ``version`` trained in: the most common segment of its window's events
    (ties: the first in the window), so that a label its events share names the row of the
    forgetting matrix the version belongs to."""
    counts = Counter(segment_of(event, version, windows) for event in events)
    if not counts:
        return version_range(version, windows)
    return counts.most_common(1)[0][0]


@dataclass(frozen=True)
class EvalExample:
    """One held-out event: what evaluation needs, and where it was read."""

    id: str
    prompt: str
    response: str
    topic: str
    partition: int
    offset: int
    # The base model's summed response-token loss on it, and the token count: the base
    # model never changes, so it is measured once, when the example joins the set, and
    # kept in the file (a restart or a replay continues with the same numbers).
    base_loss_sum: float | None = None
    tokens: int | None = None
    segment: str = UNLABELLED

    @classmethod
    def of(
        cls, topic: str, partition: int, pending: PendingEvent, version: int, windows: int
    ) -> EvalExample:
        """The held-out ``pending`` that ``version``'s window brought; ``windows`` versions
        make one version-range segment."""
        event = pending.event
        return cls(
            event.id,
            event.prompt,
            event.response,
            topic,
            partition,
            pending.offset,
            segment=segment_of(event, version, windows),
        )


def extend_eval_set(
    previous: Sequence[EvalExample], new: Iterable[EvalExample], size: int
) -> list[EvalExample]:
    """``previous`` + the examples of ``new`` whose ids it lacks, trimmed to ``size``.

    Trimming keeps every segment: each example dropped is the oldest of the segment that
    has the most (ties: the segment that appears first), never simply the oldest overall,
    or the early segments that forgetting is measured on would be the first to vanish.
    While segments are fewer than ``size``, each keeps at least one example. A set of one
    segment keeps its newest ``size``, as before segments existed.
    """
    seen = {example.id for example in previous}
    merged = list(previous)
    for example in new:
        if example.id not in seen:
            seen.add(example.id)
            merged.append(example)
    if size <= 0:
        return []
    excess = len(merged) - size
    if excess <= 0:
        return merged
    counts = Counter(example.segment for example in merged)  # in order of first appearance
    drops: Counter[str] = Counter()
    for _ in range(excess):
        # max() keeps the first of equal counts: the segment that appears first.
        largest = max(counts, key=lambda segment: counts[segment])
        counts[largest] -= 1
        drops[largest] += 1
    kept = []
    for example in merged:
        if drops[example.segment] > 0:
            drops[example.segment] -= 1
            continue
        kept.append(example)
    return kept


def segment_losses(eval_set: list[EvalExample], sums: list[tuple[float, int]]) -> list[SegmentEval]:
    """The mean response-token losses on each segment of ``eval_set`` (the version's, from
    ``sums``, and the base model's), in order of first appearance."""
    totals: dict[str, tuple[float, float, int, int]] = {}  # loss, base loss, tokens, events
    for example, (total, tokens) in zip(eval_set, sums, strict=True):
        loss, base, count, events = totals.get(example.segment, (0.0, 0.0, 0, 0))
        base += example.base_loss_sum or 0.0
        totals[example.segment] = (loss + total, base, count + tokens, events + 1)
    return [
        SegmentEval(segment=segment, loss=loss / count, base_loss=base / count, events=events)
        for segment, (loss, base, count, events) in totals.items()
    ]


def encode_eval_set(examples: Sequence[EvalExample]) -> bytes:
    """One JSON object per line, in set order (oldest first)."""
    return b"".join(orjson.dumps(asdict(example)) + b"\n" for example in examples)


def decode_eval_set(data: bytes, where: str) -> list[EvalExample]:
    """The examples of an ``eval-set.jsonl``; one written before segments existed decodes
    with every example :data:`UNLABELLED`."""
    examples = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            fields = orjson.loads(line)
            examples.append(
                EvalExample(
                    id=str(fields["id"]),
                    prompt=str(fields["prompt"]),
                    response=str(fields["response"]),
                    topic=str(fields["topic"]),
                    partition=int(fields["partition"]),
                    offset=int(fields["offset"]),
                    base_loss_sum=_float_or_none(fields.get("base_loss_sum")),
                    tokens=_int_or_none(fields.get("tokens")),
                    segment=str(fields.get("segment") or UNLABELLED),
                )
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise AdapterStoreError(f"{where}:{number}: not an evaluation example: {exc}") from exc
    return examples


def _float_or_none(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]
