"""Checks of announced lineages, shared by the soak and the rebalance tests.

Each returns a list of problems, one line each; an empty list is a pass. It serves the
tests and the soak; the product never imports it.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from aiokafka import TopicPartition

from schemas import AdapterUpdate, LearningEvent, QuarantineRecord, SchemaError, WindowSpec, decode
from trainer.lineage import Lineage
from trainer.window import Windows

__all__ = [
    "check_files",
    "check_trained_once",
    "check_versions",
    "check_windows",
    "events_by_partition",
    "first_of_each_version",
    "lineages_of",
]

WINDOW = 16


def lineages_of(updates: list[AdapterUpdate]) -> dict[str, list[AdapterUpdate]]:
    by_adapter: dict[str, list[AdapterUpdate]] = defaultdict(list)
    for u in updates:
        by_adapter[u.adapter].append(u)
    return by_adapter


def check_versions(updates: list[AdapterUpdate]) -> list[str]:
    problems = []
    for adapter, lineage in sorted(lineages_of(updates).items()):
        versions = [u.version for u in lineage]
        if versions != list(range(1, len(versions) + 1)):
            counts = Counter(versions)
            repeats = sorted(v for v, k in counts.items() if k > 1)
            gaps = sorted(set(range(1, max(versions) + 1)) - set(versions))
            problems.append(
                f"{adapter}: versions {_ranges(versions)}; repeated {repeats}, missing {gaps}"
            )
            for v in repeats[:3]:
                twins = [u for u in lineage if u.version == v]
                problems.append(
                    f"{adapter} v{v} announced {len(twins)} times: "
                    + "; ".join(
                        f"window p{u.window.partition}@{u.window.first_offset}.."
                        f"{u.window.last_offset} sha {u.sha256[:12]}"
                        for u in twins
                    )
                )
        for u in lineage:
            want = u.version - 1 if u.version > 1 else None
            if u.parent_version != want:
                problems.append(f"{adapter} v{u.version}: parent_version {u.parent_version}")
    return problems


def _ranges(values: list[int]) -> str:
    if len(values) <= 12:
        return str(values)
    return f"[{values[0]}, {values[1]}, … {values[-2]}, {values[-1]}] ({len(values)})"


def first_of_each_version(lineage: list[AdapterUpdate]) -> list[AdapterUpdate]:
    seen: dict[int, AdapterUpdate] = {}
    for u in lineage:
        seen.setdefault(u.version, u)
    return [seen[v] for v in sorted(seen)]


def check_trained_once(updates: list[AdapterUpdate]) -> list[str]:
    problems = []
    for adapter, lineage in sorted(lineages_of(updates).items()):
        ids = Counter(i for u in first_of_each_version(lineage) for i in u.window.event_ids)
        twice = sorted(i for i, k in ids.items() if k > 1)
        if twice:
            where = defaultdict(list)
            for u in first_of_each_version(lineage):
                for i in u.window.event_ids:
                    if i in twice:
                        where[i].append(f"v{u.version}")
            problems.append(
                f"{adapter}: {len(twice)} event ids trained twice, e.g. "
                + ", ".join(f"{i} in {'+'.join(where[i])}" for i in twice[:5])
            )
    return problems


def check_files(updates: list[AdapterUpdate], cache: Path | None = None) -> list[str]:
    """Every version's weights as announced; one on an object store is fetched into
    ``cache`` first (its manifest must be there, every file as it says)."""
    from trainer.exceptions import TrainerError
    from trainer.objects import fetch_version, is_remote

    problems = []
    for u in updates:
        where = u.uri
        if is_remote(u.uri):
            try:
                where = str(fetch_version(u.uri, cache or Path("/tmp/lorastream-checks")))
            except TrainerError as exc:
                problems.append(f"{u.adapter} v{u.version}: {exc}")
                continue
        path = Path(urlparse(where).path) / "adapter_model.safetensors"
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            problems.append(f"{u.adapter} v{u.version}: {exc}")
            continue
        if digest != u.sha256:
            problems.append(
                f"{u.adapter} v{u.version}: {path} has sha256 {digest[:16]}…, "
                f"announced {u.sha256[:16]}…"
            )
    return problems


def events_by_partition(records: list[Any]) -> dict[int, list[tuple[int, LearningEvent]]]:
    out: dict[int, list[tuple[int, LearningEvent]]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        try:
            out[r.partition].append((r.offset, decode(r.value, LearningEvent)))
        except SchemaError:
            continue
    return out


class _Rederived:
    """One adapter's windows as the live rule closes them, partition by partition, on demand."""

    def __init__(
        self,
        adapter: str,
        topic: str,
        by_partition: dict[int, list[tuple[int, LearningEvent]]],
        quarantined: set[tuple[int, int]],
    ) -> None:
        self.adapter = adapter
        self.topic = topic
        self.events = {
            p: [(o, e) for o, e in events if e.adapter == adapter]
            for p, events in by_partition.items()
        }
        self.cursor = dict.fromkeys(self.events, 0)
        self.quarantined = quarantined
        self.windows = Windows(WINDOW)
        self.lineage = Lineage(adapter)

    def next_window(self, p: int) -> WindowSpec | None:
        """Read partition ``p`` on until the rule closes a window that was not quarantined."""
        tp = TopicPartition(self.topic, p)
        events = self.events.get(p, [])
        while self.cursor.get(p, 0) < len(events):
            offset, event = events[self.cursor[p]]
            self.cursor[p] += 1
            _, closed = self.windows.offer(tp, offset, event, self.lineage)
            if closed is None:
                continue
            if (p, closed.last_offset) in self.quarantined:
                self.lineage.record_quarantine(closed.spec())
                continue
            return closed.spec()
        return None


def check_windows(
    records: list[Any],
    updates: list[AdapterUpdate],
    quarantined: list[QuarantineRecord],
    topic: str,
) -> list[str]:
    """Each adapter's windows, re-derived with the live rule (``Windows.offer`` and a
    ``Lineage``) from learning-events in offset order, are the announced ones.

    The partitions of an adapter are read lazily: each is read on only as far as it takes
    to close the window that the next announced version names, so that events an adapter
    has on several partitions (the hostile door's badly keyed records) meet the lineage as
    the trainer had it when that window closed.
    """
    problems: list[str] = []
    by_partition = events_by_partition(records)
    quarantine_windows: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for q in quarantined:
        if q.adapter is not None and q.window is not None:
            quarantine_windows[q.adapter].add((q.window.partition, q.window.last_offset))
    for adapter, lineage_updates in sorted(lineages_of(updates).items()):
        rule = _Rederived(adapter, topic, by_partition, quarantine_windows[adapter])
        for u in first_of_each_version(lineage_updates):
            spec = rule.next_window(u.window.partition)
            if spec is None:
                problems.append(
                    f"{adapter} v{u.version}: the rule closes no window on partition "
                    f"{u.window.partition} for it (announced {u.window.first_offset}.."
                    f"{u.window.last_offset})"
                )
            elif (spec.event_ids, spec.first_offset, spec.last_offset) != (
                u.window.event_ids,
                u.window.first_offset,
                u.window.last_offset,
            ):
                extra = sorted(set(u.window.event_ids) - set(spec.event_ids))
                short = sorted(set(spec.event_ids) - set(u.window.event_ids))
                how = (
                    "the same event ids, another order or offsets"
                    if not extra and not short
                    else f"announced only {extra[:3]} ({len(extra)}), rule only {short[:3]} "
                    f"({len(short)})"
                )
                problems.append(
                    f"{adapter} v{u.version}: announced p{u.window.partition}@"
                    f"{u.window.first_offset}..{u.window.last_offset}, the rule gives "
                    f"@{spec.first_offset}..{spec.last_offset}: {how}"
                )
            rule.lineage.record_window(u.window)  # go on from what was announced
        for p in sorted(rule.events):
            spec = rule.next_window(p)
            if spec is not None:
                problems.append(
                    f"{adapter}: the rule closes a window at p{p}@{spec.first_offset}.."
                    f"{spec.last_offset} that was never announced"
                )
    return problems
