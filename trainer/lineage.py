"""Each adapter's history: its announced versions and the events they consumed.

The announcements on ``adapter-updates`` are the lineage: versions 1, 2, 3 …
with their windows. With the quarantine records they also say, per source
partition, up to which offset an adapter's events are handled, so a window
re-read after a crash is recognised and not trained twice. This module is
pure: :mod:`trainer.history` reads the records from Kafka and hands them to
:func:`lineages_from`. A record that a reader's :class:`~trainer.signing.Verifier`
rejects (unsigned, a bad signature, a ``uri`` outside the adapter location, a version
that is not the lineage's next) is skipped and reported to it; it never stops a reader.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas import AdapterUpdate, QuarantineRecord, SchemaError, WindowSpec, decode
from trainer.exceptions import TrainerError
from trainer.signing import Verifier

__all__ = [
    "RECENT_WINDOWS",
    "Lineage",
    "apply_records",
    "lineages_from",
    "order_problem",
    "read_announcement",
]

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

    def record(self, committed: AdapterUpdate | QuarantineRecord) -> None:
        """Move on by one committed record: an announced version, or a quarantined window.

        The one way a lineage changes, whether the record was read back from Kafka
        (:func:`apply_records`) or just committed by this process's driver: the core and
        the windows only ask a lineage, never change it.
        """
        if isinstance(committed, AdapterUpdate):
            self.record_update(committed)
        elif committed.window is not None:
            self.record_quarantine(committed.window)
        else:
            raise ValueError(
                f"the quarantine record of an unreadable event is no window of {self.adapter}"
            )

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


def read_announcement(
    record: ConsumerRecord[bytes, bytes], verifier: Verifier | None = None
) -> AdapterUpdate | None:
    """The AdapterUpdate in ``record``, or None if it is a tombstone, unreadable or not to
    be trusted (``verifier`` logs it once with its position, and counts it)."""
    if record.value is None:
        return None
    verifier = verifier or Verifier()
    problem = verifier.signature_problem(record)
    if problem is not None:
        verifier.reject(record, *problem)
        return None
    try:
        update = decode(record.value, AdapterUpdate)
    except SchemaError as exc:
        verifier.reject(record, "unreadable", f"not an announcement: {exc}")
        return None
    problem = verifier.location_problem(update.uri)
    if problem is not None:
        verifier.reject(record, *problem)
        return None
    return update


def order_problem(
    newest: int, known: AdapterUpdate | None, update: AdapterUpdate
) -> tuple[str, str] | None:
    """Why ``update`` does not extend a lineage whose newest version is ``newest`` (``known``:
    the lineage's own announcement of ``update.version``, if it holds it), or None: the
    next version, or a re-read of one already there."""
    if update.version == newest + 1:
        return None
    if update.version > newest + 1:
        return "order", (
            f"{update.adapter} v{update.version} follows v{newest}: the lineage's next "
            f"version is v{newest + 1}"
        )
    if known is not None and known.sha256 != update.sha256:
        return "order", (
            f"a second, different announcement of {update.adapter} v{update.version}; "
            "the first one stands"
        )
    return None


def lineages_from(
    updates: Iterable[ConsumerRecord[bytes, bytes]],
    quarantined: Iterable[ConsumerRecord[bytes, bytes]] = (),
    verifier: Verifier | None = None,
) -> dict[str, Lineage]:
    """Every adapter's lineage from committed announcement and quarantine records."""
    lineages: dict[str, Lineage] = {}
    apply_records(lineages, updates, quarantined, verifier=verifier)
    return lineages


def apply_records(
    lineages: dict[str, Lineage],
    updates: Iterable[ConsumerRecord[bytes, bytes]],
    quarantined: Iterable[ConsumerRecord[bytes, bytes]] = (),
    unreadable: dict[TopicPartition, int] | None = None,
    verifier: Verifier | None = None,
) -> None:
    """Extend ``lineages`` with committed records; those already applied are skipped
    (a version at or below the lineage's, a quarantined window already handled), and
    those ``verifier`` rejects or that break the version order are skipped and reported.
    ``unreadable`` gets, per source partition, the last offset quarantined as unreadable."""
    verifier = verifier or Verifier()
    for record in sorted(updates, key=lambda r: (r.partition, r.offset)):
        update = read_announcement(record, verifier)
        if update is None:
            continue
        lineage = lineages.get(update.adapter) or Lineage(update.adapter)
        known = None
        if lineage.updates and lineage.updates[0].version <= update.version <= lineage.version:
            known = lineage.updates[update.version - lineage.updates[0].version]
        problem = order_problem(lineage.version, known, update)
        if problem is not None:
            verifier.reject(record, *problem)
        elif update.version > lineage.version:
            lineage.record(update)
            lineages[update.adapter] = lineage  # a rejected record makes no lineage
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
        lineages.setdefault(entry.adapter, Lineage(entry.adapter)).record(entry)
