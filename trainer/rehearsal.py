"""Rehearsal: each step mixes a sample of the adapter's earlier events into its window.

A continual learner that steps on the newest window alone drifts away from
what it learned before. Rehearsal keeps a bounded buffer of each adapter's
trained events (never its held-out ones) and mixes ``k`` of them into every
step's batch.

The buffer is a reservoir sample (Vitter's algorithm R) over the adapter's
lineage: after ``seen`` trained events it holds ``min(seen, size)`` of them,
each with the same chance. It is written beside each version's weights as
``rehearsal.jsonl``, so a trainer that resumes, takes over with an empty
cache, or a replay that re-derives the lineage, continues from the same
buffer.

Every random choice is a sha256 of the config's seed, the version number,
the event ids and the ``seen`` count: never of the adapter's name (a replay
into new names draws the same), the clock or the process. A version's
buffer is a function of its parent's buffer and its window's trained ids;
its step's sample is a function of its parent's buffer, the seed and its
version number. No Kafka and no torch here: plain values in and out.

The file, one JSON object per line (UTF-8, ``\\n`` after each)::

    {"seen":N}
    {"id":"e17","prompt":"...","response":"..."}
    ...

``seen`` counts every trained event the reservoir was offered; the events
follow in buffer order (their slots, which replacement keeps).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson

from schemas import RehearsalSpec
from trainer.exceptions import AdapterStoreError

__all__ = [
    "Buffer",
    "Plan",
    "Rehearsed",
    "decode_buffer",
    "encode_buffer",
    "extend_buffer",
    "plan",
    "sample",
    "sample_digest",
]


@dataclass(frozen=True)
class Rehearsed:
    """One trained event kept for rehearsal: what a step needs, and its id."""

    id: str
    prompt: str
    response: str

    @property
    def example(self) -> tuple[str, str]:
        return (self.prompt, self.response)


@dataclass(frozen=True)
class Buffer:
    """A reservoir of an adapter's trained events, and how many it was offered."""

    seen: int = 0
    events: tuple[Rehearsed, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What a version's step rehearses, and the rehearsal buffer the version leaves."""

    sample: list[Rehearsed]
    buffer: Buffer

    @property
    def examples(self) -> list[tuple[str, str]]:
        return [event.example for event in self.sample]

    @property
    def spec(self) -> RehearsalSpec:
        return RehearsalSpec(events=len(self.sample), digest=sample_digest(self.sample))


def plan(
    parent: Buffer, version: int, trained: Iterable[Rehearsed], k: int, size: int, seed: int
) -> Plan:
    """Version ``version``'s rehearsal: ``k`` events sampled from its ``parent``'s buffer,
    and that buffer offered the window's ``trained`` events (after the sample is drawn)."""
    return Plan(sample(parent, k, seed, version), extend_buffer(parent, trained, size, seed))


def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")


def extend_buffer(buffer: Buffer, trained: Iterable[Rehearsed], size: int, seed: int) -> Buffer:
    """``buffer`` after the reservoir is offered ``trained``, in order (algorithm R).

    The n-th event offered (counting from 1 over the lineage) fills a free slot, or
    else replaces slot ``j = sha256("reservoir:{seed}:{n}:{id}") mod n`` when j < size.
    A buffer written under a larger size keeps its first ``size`` slots.
    """
    if size < 1:
        raise ValueError(f"a rehearsal buffer holds at least 1 event, not {size}")
    slots = list(buffer.events[:size])
    seen = buffer.seen
    for event in trained:
        seen += 1
        if len(slots) < size:
            slots.append(event)
            continue
        j = _hash_int(f"reservoir:{seed}:{seen}:{event.id}") % seen
        if j < size:
            slots[j] = event
    return Buffer(seen, tuple(slots))


def sample(buffer: Buffer, k: int, seed: int, version: int) -> list[Rehearsed]:
    """The ``min(k, len(buffer))`` events that version ``version``'s step rehearses.

    ``buffer`` is its parent's: the window's own events join only after the step.
    The slots are ranked by ``sha256("rehearsal:{seed}:{version}:{slot}:{id}")`` and the
    first ``k`` taken, in that order: no dependence on Python's ``random``, whose
    algorithms may change between versions.
    """
    if k <= 0 or not buffer.events:
        return []
    ranked = sorted(
        range(len(buffer.events)),
        key=lambda slot: _hash_int(f"rehearsal:{seed}:{version}:{slot}:{buffer.events[slot].id}"),
    )
    return [buffer.events[slot] for slot in ranked[:k]]


def sample_digest(events: Sequence[Rehearsed]) -> str:
    """sha256 hex of the sampled ids joined by ``\\n``, in sample order (the announcement's)."""
    return hashlib.sha256("\n".join(event.id for event in events).encode()).hexdigest()


def encode_buffer(buffer: Buffer) -> bytes:
    """``{"seen":N}`` then one ``{"id","prompt","response"}`` per line, in slot order."""
    lines = [orjson.dumps({"seen": buffer.seen})]
    lines += [
        orjson.dumps({"id": e.id, "prompt": e.prompt, "response": e.response})
        for e in buffer.events
    ]
    return b"".join(line + b"\n" for line in lines)


def decode_buffer(data: bytes, where: str) -> Buffer:
    """The buffer ``encode_buffer`` wrote; an AdapterStoreError names ``where:line``."""
    lines = data.splitlines()
    if not lines:
        raise AdapterStoreError(f"{where}:1: empty, but a rehearsal buffer starts with seen")
    try:
        head = orjson.loads(lines[0])
        seen = head["seen"]
        if not isinstance(seen, int) or isinstance(seen, bool) or seen < 0:
            raise ValueError(f"seen must be a count, not {seen!r}")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise AdapterStoreError(f"{where}:1: not a rehearsal buffer's head: {exc}") from exc
    events = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            fields = orjson.loads(line)
            events.append(
                Rehearsed(_text(fields, "id"), _text(fields, "prompt"), _text(fields, "response"))
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise AdapterStoreError(f"{where}:{number}: not a rehearsal event: {exc}") from exc
    if len(events) > seen:
        raise AdapterStoreError(f"{where}:1: holds {len(events)} events but has seen {seen}")
    return Buffer(seen, tuple(events))


def _text(fields: object, name: str) -> str:
    if not isinstance(fields, dict):
        raise TypeError("not a JSON object")
    value = fields[name]
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}")
    return value
