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

import difflib
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas import (
    ADAPTER_PATTERN,
    AdapterUpdate,
    QuarantineRecord,
    SchemaError,
    WindowSpec,
    decode,
)
from trainer.exceptions import TrainerError
from trainer.signing import Verifier

__all__ = [
    "NAME_RULE",
    "RECENT_WINDOWS",
    "AdapterNameError",
    "Lineage",
    "apply_records",
    "check_adapter_name",
    "existing",
    "lineages_from",
    "order_problem",
    "read_announcement",
    "unknown_adapter",
]

# Windows whose event ids a snapshot keeps: an event delivered again (the scoring stage
# is at least once) at a new offset is recognised by its id within this many windows.
RECENT_WINDOWS = 8


# ADAPTER_PATTERN in words, for the one line that refuses a name.
NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-', the first a letter or digit"


class AdapterNameError(TrainerError):
    """A flag names no adapter: not a valid name, or the name of none that exists."""


def check_adapter_name(flag: str, name: str) -> None:
    """Refuse ``name`` (given by ``flag``) unless it is a valid adapter name."""
    if not re.match(ADAPTER_PATTERN, name):
        raise AdapterNameError(f"{flag} {name!r} is not an adapter name ({NAME_RULE})")


def unknown_adapter(flag: str, name: str, known: Iterable[str], where: str) -> AdapterNameError:
    """The error for ``name`` (given by ``flag``), which names none of the ``known``
    adapters (those found in ``where``)."""
    return AdapterNameError(f"{flag} {name}: no adapter {name} in {where}; {existing(name, known)}")


def existing(name: str, known: Iterable[str], what: str = "the adapters that exist") -> str:
    """``what``: the ``known`` adapters, closest to ``name`` first (difflib), so that a
    typo's correction comes first; or that there is none."""
    names = sorted(set(known))
    if not names:
        return f"{what}: none"
    folded = [n for n in names if n.lower() == name.lower()]  # "Tutor" for "tutor"
    close = difflib.get_close_matches(name, names, n=len(names), cutoff=0.0)
    ordered = folded + [n for n in close if n not in folded]
    return f"{what}: " + ", ".join(ordered)


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
    def window_size(self) -> int | None:
        """The trainer's window size as this lineage shows it (None before a first version):
        the size the trainer recorded with its newest window, or, for announcements made
        before it recorded one, the largest of its newest windows (a window closes when
        full, or partial after LORASTREAM_MAX_WAIT_SECONDS, so the largest of the recent
        ones is a full one)."""
        if self.updates and self.updates[-1].window.full_size is not None:
            return self.updates[-1].window.full_size
        recent = self.updates[-RECENT_WINDOWS:]
        return max((u.window.size for u in recent), default=None)

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
