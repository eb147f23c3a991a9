"""Each adapter's evaluation set: its held-out events, which no window trains on.

A version's evaluation set is its parent's, plus the held-out events that
its window brought (:attr:`~trainer.window.Window.held_out`, in read order,
an id already in the set skipped), trimmed to the newest ``size``. It is
written beside the version's weights (``eval-set.jsonl``, JSON only), so a
trainer that resumes from the version, or a replay that re-derives it with the
same window rule, continues from the same set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import orjson

from trainer.exceptions import AdapterStoreError
from trainer.window import PendingEvent

__all__ = ["EvalExample", "decode_eval_set", "encode_eval_set", "extend_eval_set"]


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

    @classmethod
    def of(cls, topic: str, partition: int, pending: PendingEvent) -> EvalExample:
        event = pending.event
        return cls(event.id, event.prompt, event.response, topic, partition, pending.offset)


def extend_eval_set(
    previous: Sequence[EvalExample], new: Iterable[EvalExample], size: int
) -> list[EvalExample]:
    """``previous`` + the examples of ``new`` whose ids it lacks, the newest ``size`` kept."""
    seen = {example.id for example in previous}
    merged = list(previous)
    for example in new:
        if example.id not in seen:
            seen.add(example.id)
            merged.append(example)
    return merged[-size:] if size > 0 else []


def encode_eval_set(examples: Sequence[EvalExample]) -> bytes:
    """One JSON object per line, in set order (oldest first)."""
    return b"".join(orjson.dumps(asdict(example)) + b"\n" for example in examples)


def decode_eval_set(data: bytes, where: str) -> list[EvalExample]:
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
                )
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise AdapterStoreError(f"{where}:{number}: not an evaluation example: {exc}") from exc
    return examples


def _float_or_none(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]
