"""Each adapter's history: its announced versions and the events they consumed.

The announcements on ``adapter-updates`` are the lineage: versions 1, 2, 3 …
with their windows. With the quarantine records they also say, per source
partition, up to which offset an adapter's events are handled, so a window
re-read after a crash is recognised and not trained twice. This module is
pure: :mod:`trainer.history` reads the records from Kafka and hands them to
:func:`lineages_from`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas import AdapterUpdate, QuarantineRecord, SchemaError, WindowSpec, decode
from trainer.exceptions import TrainerError

__all__ = ["RECENT_WINDOWS", "Lineage", "apply_records", "lineages_from", "read_announcement"]

log = logging.getLogger(__name__)

# Windows whose event ids a snapshot keeps: an event delivered again (the scoring stage
# is at least once) at a new offset is recognised by its id within this many windows.
RECENT_WINDOWS = 8


@dataclass
class Lineage:
    """What is known of one adapter: its announced versions and the events they consumed."""

    adapter: str
    # The announced versions in order; resumed from a snapshot (trainer.snapshot), only
    # the newest: versions before it are in adapter-updates, and nothing here needs them.
    updates: list[AdapterUpdate] = field(default_factory=list)
    trained_ids: set[str] = field(default_factory=set)
    handled: dict[TopicPartition, int] = field(default_factory=dict)
    quarantined_windows: set[tuple[str, int, int]] = field(default_factory=set)
    # The event ids of the newest windows, newest last: what a snapshot keeps of trained_ids.
    recent_windows: deque[list[str]] = field(default_factory=lambda: deque(maxlen=RECENT_WINDOWS))

    @property
    def version(self) -> int:
        return self.updates[-1].version if self.updates else 0

    @property
    def latest(self) -> AdapterUpdate | None:
        return self.updates[-1] if self.updates else None

    @property
    def quarantined(self) -> int:
        """How many windows of this adapter were quarantined."""
        return len(self.quarantined_windows)

    @property
    def is_empty(self) -> bool:
        """Nothing announced or quarantined yet."""
        return not self.updates and not self.quarantined

    def record_update(self, update: AdapterUpdate) -> None:
        if update.version != self.version + 1:
            raise TrainerError(
                f"adapter {self.adapter}: announcement of version {update.version} follows "
                f"version {self.version}; the adapter-updates topic has a gap or a repeat"
            )
        self.updates.append(update)
        self.record_window(update.window)

    def record_quarantine(self, window: WindowSpec) -> None:
        self.quarantined_windows.add((window.topic, window.partition, window.last_offset))
        self._handled(window.topic, window.partition, window.last_offset)

    def record_window(self, window: WindowSpec) -> None:
        """The window's events are consumed: its ids are trained, its offsets handled."""
        self.trained_ids.update(window.event_ids)
        self.recent_windows.append(list(window.event_ids))
        self._handled(window.topic, window.partition, window.last_offset)

    def _handled(self, topic: str, partition: int, last_offset: int) -> None:
        tp = TopicPartition(topic, partition)
        self.handled[tp] = max(self.handled.get(tp, -1), last_offset)

    def is_handled(self, tp: TopicPartition, offset: int) -> bool:
        return offset <= self.handled.get(tp, -1)

    def admits(self, tp: TopicPartition, offset: int, event_id: str) -> bool:
        """Whether an event read at ``tp``/``offset`` is new to this lineage (the
        scoring stage delivers at least once, and a crash re-reads records)."""
        return not self.is_handled(tp, offset) and event_id not in self.trained_ids


def read_announcement(record: ConsumerRecord[bytes, bytes]) -> AdapterUpdate | None:
    """The AdapterUpdate in ``record``, or None (logged with its position) if unreadable."""
    try:
        return decode(record.value, AdapterUpdate)
    except SchemaError as exc:
        log.warning(
            "skipping an unreadable announcement at %s[%s]@%s: %s",
            record.topic,
            record.partition,
            record.offset,
            exc,
        )
        return None


def lineages_from(
    updates: Iterable[ConsumerRecord[bytes, bytes]],
    quarantined: Iterable[ConsumerRecord[bytes, bytes]] = (),
) -> dict[str, Lineage]:
    """Every adapter's lineage from committed announcement and quarantine records."""
    lineages: dict[str, Lineage] = {}
    apply_records(lineages, updates, quarantined)
    return lineages


def apply_records(
    lineages: dict[str, Lineage],
    updates: Iterable[ConsumerRecord[bytes, bytes]],
    quarantined: Iterable[ConsumerRecord[bytes, bytes]] = (),
    unreadable: dict[TopicPartition, int] | None = None,
) -> None:
    """Extend ``lineages`` with committed records; those already applied are skipped
    (a version at or below the lineage's, a quarantined window already handled).
    ``unreadable`` gets, per source partition, the last offset quarantined as unreadable."""
    for record in sorted(updates, key=lambda r: (r.partition, r.offset)):
        update = read_announcement(record)
        if update is None:
            continue
        lineage = lineages.setdefault(update.adapter, Lineage(update.adapter))
        if update.version > lineage.version:
            lineage.record_update(update)
        elif (
            update.version >= lineage.updates[0].version
            and lineage.updates[update.version - lineage.updates[0].version].sha256 != update.sha256
        ):
            log.error(
                "adapter-updates holds two different announcements of %s v%d (the second at "
                "%s[%s]@%s); the first one stands",
                update.adapter,
                update.version,
                record.topic,
                record.partition,
                record.offset,
            )
    for record in sorted(quarantined, key=lambda r: (r.partition, r.offset)):
        try:
            entry = decode(record.value, QuarantineRecord)
        except SchemaError:
            continue
        if entry.source is not None and unreadable is not None:
            tp = TopicPartition(entry.source.topic, entry.source.partition)
            unreadable[tp] = max(unreadable.get(tp, -1), entry.source.offset)
        if entry.adapter is None or entry.window is None:
            continue
        lineages.setdefault(entry.adapter, Lineage(entry.adapter)).record_quarantine(entry.window)
