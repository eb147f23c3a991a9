"""Count-based tumbling windows per adapter, and the offsets that are safe to commit.

One partition of ``learning-events`` interleaves the events of many adapters;
each adapter fills its own window in offset order. The offset committed for
a partition may never pass the first event of a window still being filled,
or a crash would lose that window's head. :class:`Windows` tracks both.

With an evaluation fraction, an event whose id hashes below it
(:func:`held_out`) never enters a window: it waits, like an open window, in
its adapter's held-out list until the next window of that adapter closes and
is committed (:meth:`Windows.settle`), and the version trained on that window
is evaluated on it. The choice depends on the id alone, so every trainer
instance and every replay hold out the same events.

An adapter on hold (:meth:`Windows.pin`) keeps its closed window's first
offset as the partition's committable bound and takes no more events: they
are read again, from the committed offset, once the hold is lifted.

A closed window holds the committable offset back too, until the driver
settles it (its outcome committed) or pins it: a driver that gathers closed
windows to step them together commits nothing past one still waiting.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from schemas import LearningEvent, WindowSpec, window_text
from trainer.lineage import Lineage

__all__ = ["PendingEvent", "Skipped", "Window", "Windows", "held_out"]

# A skip report names this many ids; the count says how many more there were.
SKIPPED_IDS_SHOWN = 5


def held_out(event_id: str, fraction: float) -> bool:
    """Whether the event ``event_id`` is kept for evaluation: the first 8 bytes of the
    sha256 of its id, as a fraction of 2**64, below ``fraction``. Never for 0."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(event_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass(frozen=True)
class PendingEvent:
    offset: int
    event: LearningEvent


@dataclass
class Window:
    """The events of one adapter from one partition, in offset order."""

    adapter: str
    tp: TopicPartition
    events: list[PendingEvent] = field(default_factory=list)
    # The adapter's held-out events read since its last window, up to this one's close:
    # the version trained on this window adds them to its evaluation set.
    held_out: list[PendingEvent] = field(default_factory=list)
    opened_at: float = field(default_factory=time.monotonic)
    full_size: int | None = None  # the trainer's window size, recorded in the spec

    @property
    def first_offset(self) -> int:
        return self.events[0].offset

    @property
    def last_offset(self) -> int:
        return self.events[-1].offset

    @property
    def ids(self) -> list[str]:
        return [pending.event.id for pending in self.events]

    def examples(self) -> list[tuple[str, str]]:
        return [(pending.event.prompt, pending.event.response) for pending in self.events]

    def __str__(self) -> str:
        return window_text(self.tp.topic, self.tp.partition, self.first_offset, self.last_offset)

    def spec(self) -> WindowSpec:
        return WindowSpec(
            topic=self.tp.topic,
            partition=self.tp.partition,
            first_offset=self.first_offset,
            last_offset=self.last_offset,
            size=len(self.events),
            event_ids=self.ids,
            full_size=self.full_size,
        )


@dataclass
class Skipped:
    """Events of one partition not admitted as already handled, since the last report."""

    tp: TopicPartition
    first_offset: int
    last_offset: int
    count: int = 0
    ids: list[str] = field(default_factory=list)  # the first SKIPPED_IDS_SHOWN

    def add(self, offset: int, event_id: str) -> None:
        self.count += 1
        self.first_offset = min(self.first_offset, offset)
        self.last_offset = max(self.last_offset, offset)
        if len(self.ids) < SKIPPED_IDS_SHOWN:
            self.ids.append(event_id)

    def __str__(self) -> str:
        more = self.count - len(self.ids)
        where = window_text(self.tp.topic, self.tp.partition, self.first_offset, self.last_offset)
        return f"{where}, ids {', '.join(self.ids)}" + (f" and {more} more" if more else "")


class Windows:
    """Open windows per (partition, adapter), and the next offset read per partition."""

    def __init__(self, size: int, eval_fraction: float = 0.0) -> None:
        if size < 1:
            raise ValueError(f"window size must be at least 1, not {size}")
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval fraction must be in [0, 1), not {eval_fraction}")
        self.size = size
        self.eval_fraction = eval_fraction
        self._open: dict[tuple[TopicPartition, str], Window] = {}
        self._held: dict[tuple[TopicPartition, str], list[PendingEvent]] = {}
        self._next: dict[TopicPartition, int] = {}
        # Adapters on hold, per partition: the first offset of the window they could not train.
        self._pinned: dict[tuple[TopicPartition, str], int] = {}
        # Duplicates refused since the driver last asked (:meth:`take_skipped`).
        self._skipped: dict[TopicPartition, Skipped] = {}
        # Closed windows not yet settled or pinned, by (partition, adapter, first offset).
        self._closed: dict[tuple[TopicPartition, str, int], Window] = {}

    def add(self, tp: TopicPartition, offset: int, event: LearningEvent) -> Window | None:
        """Add an event; return its window when this event filled it (the window is closed)."""
        key = (tp, event.adapter)
        window = self._open.get(key)
        if window is None:
            window = self._open[key] = Window(event.adapter, tp, full_size=self.size)
        window.events.append(PendingEvent(offset, event))
        if len(window.events) >= self.size:
            return self._close(key)
        return None

    def _close(self, key: tuple[TopicPartition, str]) -> Window:
        window = self._open.pop(key)
        self._closed[(window.tp, window.adapter, window.first_offset)] = window
        # Copied, not moved: until the driver commits the window's outcome they still hold
        # the committable offset back (a crash reads them again), then :meth:`settle` drops them.
        window.held_out = list(self._held.get(key, ()))
        return window

    def settle(self, window: Window) -> None:
        """The driver committed ``window``'s outcome: its held-out events are no longer
        pending (in the version's evaluation set, or gone with a quarantined window)."""
        key = (window.tp, window.adapter)
        self._closed.pop((window.tp, window.adapter, window.first_offset), None)
        taken = {pending.offset for pending in window.held_out}
        left = [p for p in self._held.get(key, ()) if p.offset not in taken]
        if left:
            self._held[key] = left
        else:
            self._held.pop(key, None)

    def offer(
        self, tp: TopicPartition, offset: int, event: LearningEvent, lineage: Lineage
    ) -> tuple[bool, Window | None]:
        """Take one event read at ``tp``/``offset`` for ``lineage``: ``(admitted, closed)``.

        The rule both drivers share. An event the lineage has already handled
        (its offset) or trained (its id), or one its open window already holds,
        is not admitted: the scoring stage delivers at least once and a crash
        re-reads records. ``closed`` is the window this event filled. Either
        way the record counts as read. A held-out event is admitted to the
        adapter's held-out list instead (by the same rule), and never closes a window.
        An adapter on hold admits nothing (:meth:`pin`).
        """
        if (tp, event.adapter) in self._pinned:
            self.mark_read(tp, offset)
            return False, None
        if self.holds_out(event.id):
            admitted = lineage.admits(tp, offset, event.id) and not any(
                p.event.id == event.id for p in self._held.get((tp, event.adapter), ())
            )
            if admitted:
                self._held.setdefault((tp, event.adapter), []).append(PendingEvent(offset, event))
            else:
                self._skip(tp, offset, event.id)
            self.mark_read(tp, offset)
            return admitted, None
        admitted = lineage.admits(tp, offset, event.id) and not self.holds(
            tp, event.adapter, event.id
        )
        closed = None
        if admitted:
            closed = self.add(tp, offset, event)
        else:
            self._skip(tp, offset, event.id)
        self.mark_read(tp, offset)
        return admitted, closed

    def _skip(self, tp: TopicPartition, offset: int, event_id: str) -> None:
        skipped = self._skipped.setdefault(tp, Skipped(tp, offset, offset))
        skipped.add(offset, event_id)

    def take_skipped(self) -> list[Skipped]:
        """The duplicates refused since the last call, one report per partition: a
        re-produce or a crash's re-read shows in the log as one line, not one per event."""
        taken = list(self._skipped.values())
        self._skipped.clear()
        return taken

    def holds_out(self, event_id: str) -> bool:
        """Whether this event is held out of training, for evaluation."""
        return held_out(event_id, self.eval_fraction)

    def holds(self, tp: TopicPartition, adapter: str, event_id: str) -> bool:
        """Whether ``adapter``'s open window on ``tp``, or a closed window of it still
        waiting for its outcome's commit (on any partition, as its lineage would), holds
        ``event_id``: a duplicate of it is not admitted."""
        window = self._open.get((tp, adapter))
        if window is not None and any(p.event.id == event_id for p in window.events):
            return True
        return any(
            w.adapter == adapter and any(p.event.id == event_id for p in w.events)
            for w in self._closed.values()
        )

    def pin(self, window: Window) -> None:
        """Hold ``window``'s adapter on its partition: nothing is committed from the window's
        first event on, and the adapter's later events are not taken (read again later)."""
        key = (window.tp, window.adapter)
        self._closed.pop((window.tp, window.adapter, window.first_offset), None)
        self._pinned[key] = min(self._pinned.get(key, window.first_offset), window.first_offset)
        # Events taken after it while it waited to step with others': read again too.
        self._open.pop(key, None)

    def pinned(self) -> set[str]:
        return {adapter for _, adapter in self._pinned}

    def mark_read(self, tp: TopicPartition, offset: int) -> None:
        """The record at ``offset`` has been handled (added, skipped or quarantined)."""
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def expired(self, max_wait: float | None) -> Iterator[Window]:
        """Close and yield the partial windows older than ``max_wait`` seconds."""
        if max_wait is None:
            return
        now = time.monotonic()
        for key in [k for k, w in self._open.items() if now - w.opened_at >= max_wait]:
            yield self._close(key)

    def committable(self, settling: Iterable[Window] = ()) -> dict[TopicPartition, int]:
        """Per partition: the offset below which every record is handled for good, once
        the outcomes of the closed windows ``settling`` are committed with it."""
        offsets = dict(self._next)
        going = {(w.tp, w.adapter, w.first_offset) for w in settling}
        for tp, _, first in self._closed.keys() - going:
            offsets[tp] = min(offsets.get(tp, first), first)
        for (tp, _), window in self._open.items():
            offsets[tp] = min(offsets.get(tp, window.first_offset), window.first_offset)
        for (tp, _), held in self._held.items():
            if held:  # held-out events not yet in a committed version are read again
                offsets[tp] = min(offsets.get(tp, held[0].offset), held[0].offset)
        for (tp, _), first in self._pinned.items():
            offsets[tp] = min(offsets.get(tp, first), first)
        return offsets

    def drop(self, partitions: set[TopicPartition]) -> None:
        """Forget revoked partitions: their uncommitted records go to the next owner."""
        for key in [k for k in self._open if k[0] in partitions]:
            del self._open[key]
        for key in [k for k in self._held if k[0] in partitions]:
            del self._held[key]
        for key in [k for k in self._pinned if k[0] in partitions]:
            del self._pinned[key]
        self._closed = {c: w for c, w in self._closed.items() if c[0] not in partitions}
        for tp in partitions:
            self._next.pop(tp, None)

    def keep_only(self, partitions: set[TopicPartition]) -> None:
        """Forget every partition but ``partitions`` (the new assignment)."""
        known = (
            set(self._next)
            | {tp for tp, _ in self._open}
            | {tp for tp, _ in self._held}
            | {tp for tp, _ in self._pinned}
            | {tp for tp, _, _ in self._closed}
        )
        self.drop(known - partitions)

    def open_windows(self) -> list[Window]:
        return list(self._open.values())

    def held(self) -> dict[str, int]:
        """Held-out events not yet in a committed version, per adapter."""
        counts: dict[str, int] = {}
        for (_, adapter), events in self._held.items():
            counts[adapter] = counts.get(adapter, 0) + len(events)
        return counts

    def pending(self) -> dict[str, int]:
        """Events waiting in open windows, per adapter (over its partitions)."""
        counts: dict[str, int] = {}
        for (_, adapter), window in self._open.items():
            counts[adapter] = counts.get(adapter, 0) + len(window.events)
        return counts
