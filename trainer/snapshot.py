"""Each adapter's lineage in one record, on a compacted topic: a resume in O(adapters).

``adapter-updates`` is the history: every version, forever. A trainer that
starts needs far less of it: per adapter the newest announcement, the source
offsets its windows have handled, and the ids of its newest windows (to know
an event delivered again). With every announcement the driver writes, in the
same transaction, a :class:`LineageSnapshot` keyed by the adapter to
``adapter-updates.latest``, a compacted topic: Kafka keeps the newest record
per adapter. A start reads that topic, then ``adapter-updates`` only from the
end it had when the start began.

The topic is a cache of ``adapter-updates``, never its replacement. It is
trusted only once it is complete and every key's NEWEST record (what compaction
leaves) is readable: :func:`read_snapshot` and :func:`read_completion` say why
one is not (bad JSON, a schema error, a tombstone, a snapshot keyed by another
adapter). A trainer that finds no :data:`COMPLETE` record there (a new pipeline,
one from before this topic), or one it cannot read, or any snapshot it cannot
read, reads the history in full and writes every adapter's snapshot and that
record in one transaction before it trains. (A replay alone writes the
snapshots of its own lineage, which is not enough.)
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from schemas import AdapterUpdate, SchemaError, decode, encode
from trainer.lineage import RECENT_WINDOWS, Lineage
from trainer.signing import Verifier, verified

__all__ = [
    "COMPLETE",
    "Completion",
    "LineageSnapshot",
    "UnreadableSnapshot",
    "completion",
    "lineage_of",
    "read_completion",
    "read_snapshot",
    "snapshot_of",
]

# The key of the record that says every adapter has its snapshot on the topic ("." is
# never an adapter's name); its value says by whom.
COMPLETE = "."


class HandledOffset(BaseModel):
    model_config = ConfigDict(frozen=True)

    topic: StrictStr
    partition: StrictInt = Field(ge=0)
    offset: StrictInt = Field(ge=0)


class LineageSnapshot(BaseModel):
    """One adapter's lineage as of its newest version."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: StrictInt = 1
    adapter: StrictStr
    update: AdapterUpdate
    handled: list[HandledOffset]
    recent_windows: list[list[StrictStr]] = Field(max_length=RECENT_WINDOWS)


def snapshot_of(lineage: Lineage, update: AdapterUpdate | None = None) -> LineageSnapshot:
    """``lineage``'s snapshot, once ``update`` (its next version) is recorded; without
    ``update``, as it stands. ``lineage`` itself is not changed."""
    handled = dict(lineage.handled)
    windows = list(lineage.recent_windows)
    newest = update or lineage.latest
    if newest is None:
        raise ValueError(f"adapter {lineage.adapter} has no version to snapshot")
    if update is not None:
        w = update.window
        tp = TopicPartition(w.topic, w.partition)
        handled[tp] = max(handled.get(tp, -1), w.last_offset)
        windows = [*windows, list(w.event_ids)][-RECENT_WINDOWS:]
    return LineageSnapshot(
        adapter=lineage.adapter,
        update=newest,
        handled=[
            HandledOffset(topic=tp.topic, partition=tp.partition, offset=offset)
            for tp, offset in sorted(
                handled.items(), key=lambda item: (item[0].topic, item[0].partition)
            )
        ],
        recent_windows=windows,
    )


def lineage_of(snapshot: LineageSnapshot) -> Lineage:
    """The lineage a snapshot resumes: its newest version, its handled offsets, the ids of
    its newest windows."""
    lineage = Lineage(snapshot.adapter, updates=[snapshot.update])
    for entry in snapshot.handled:
        lineage.handled[TopicPartition(entry.topic, entry.partition)] = entry.offset
    for ids in snapshot.recent_windows:
        lineage.recent_windows.append(list(ids))
        lineage.trained_ids.update(ids)
    return lineage


class UnreadableSnapshot(Exception):
    """A record of the snapshot topic that cannot be trusted; the message says why."""


class Completion(BaseModel):
    """The value of the :data:`COMPLETE` record: who completed the topic, and the positions
    (partition, offset) of unreadable records it found under keys that are no adapter's
    (nothing to rewrite there: they are known, and not a reason to read the history again)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    complete: bool
    by: StrictStr = ""
    unreadable: list[tuple[StrictInt, StrictInt]] = Field(default_factory=list)


def read_snapshot(
    record: ConsumerRecord[bytes, bytes], verifier: Verifier | None = None
) -> LineageSnapshot:
    """The adapter's snapshot in ``record`` (the newest of its key), or UnreadableSnapshot.

    The one place that decides whether a snapshot is trusted: a tombstone, one that
    ``verifier`` rejects (its signature, or a ``uri`` outside the adapter location:
    :func:`trainer.signing.verified`, which logs it once), bad JSON, a schema error, or a
    snapshot of another adapter than its key is not."""
    if record.value is None:
        raise UnreadableSnapshot("a tombstone")
    if not verified(record, verifier):
        raise UnreadableSnapshot("it fails verification (trainer.signing)")
    try:
        snapshot = decode(record.value, LineageSnapshot)
    except SchemaError as exc:
        raise UnreadableSnapshot(str(exc)) from exc
    if record.key != snapshot.adapter.encode():
        raise UnreadableSnapshot(f"a snapshot of {snapshot.adapter!r} under another key")
    return snapshot


def read_completion(
    record: ConsumerRecord[bytes, bytes], verifier: Verifier | None = None
) -> Completion:
    """The :data:`COMPLETE` record's value, or UnreadableSnapshot (a tombstone, one that
    ``verifier`` rejects, bad JSON, or one that does not say ``complete``)."""
    if record.value is None:
        raise UnreadableSnapshot("a tombstone")
    if not verified(record, verifier):
        raise UnreadableSnapshot("it fails verification (trainer.signing)")
    try:
        found = Completion.model_validate(orjson.loads(record.value))
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise UnreadableSnapshot(f"not a completion record: {str(exc)[:200]}") from exc
    if not found.complete:
        raise UnreadableSnapshot("a completion record that says it is not complete")
    return found


def completion(
    lineages: dict[str, Lineage], by: str, unreadable: Iterable[tuple[int, int]] = ()
) -> list[tuple[str, bytes]]:
    """The records that make the snapshot topic complete: every adapter's snapshot (those
    with a version), then the :data:`COMPLETE` record; keys and values. ``unreadable`` are
    the positions of unreadable records under keys that are no adapter's (the record
    names them, so that they do not make the next start read the history again)."""
    records = [
        (adapter, encode(snapshot_of(lineage)))
        for adapter, lineage in sorted(lineages.items())
        if lineage.latest is not None
    ]
    done = Completion(complete=True, by=by, unreadable=sorted(unreadable))
    return [*records, (COMPLETE, orjson.dumps(done.model_dump()))]
