"""Each adapter's lineage in one record, on a compacted topic: a resume in O(adapters).

``adapter-updates`` is the history: every version, forever. A trainer that
starts needs far less of it: per adapter the newest announcement, the source
offsets its windows have handled, and the ids of its newest windows (to know
an event delivered again). With every announcement the driver writes, in the
same transaction, a :class:`LineageSnapshot` keyed by the adapter to
``adapter-updates.latest``, a compacted topic: Kafka keeps the newest record
per adapter. A start reads that topic, then ``adapter-updates`` only from the
end it had when the start began.

The topic is trusted only once it is complete: a trainer that finds no
:data:`COMPLETE` record there (a new pipeline, or one from before this topic)
reads the history in full, once, and writes every adapter's snapshot and that
record in one transaction before it trains. (A replay alone writes the
snapshots of its own lineage, which is not enough.)
"""

from __future__ import annotations

from aiokafka import TopicPartition
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from schemas import AdapterUpdate
from trainer.lineage import RECENT_WINDOWS, Lineage

__all__ = ["COMPLETE", "LineageSnapshot", "completion", "lineage_of", "snapshot_of"]

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


def completion(lineages: dict[str, Lineage], by: str) -> list[tuple[str, bytes]]:
    """The records that make the snapshot topic complete: every adapter's snapshot (those
    with a version), then the :data:`COMPLETE` record; keys and values."""
    import orjson

    from schemas import encode

    records = [
        (adapter, encode(snapshot_of(lineage)))
        for adapter, lineage in sorted(lineages.items())
        if lineage.latest is not None
    ]
    return [*records, (COMPLETE, orjson.dumps({"complete": True, "by": by}))]
