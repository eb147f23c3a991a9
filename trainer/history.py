"""The lineage log: every adapter's lineage, read back from Kafka and kept current.

The lineage of every adapter is rebuilt from ``adapter-updates`` and the
quarantine topic (:class:`LineageLog`, :func:`load_lineages`), or from the
compacted snapshots when they can be trusted (:mod:`trainer.snapshot`). Every
read goes through the one committed reader (:mod:`trainer.committed`):
committed records only, up to the settled end, no group's offsets moved.
"""

from __future__ import annotations

import logging

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas import AdapterUpdate
from schemas.limits import clip
from trainer.committed import committed_ends, read_committed_topic
from trainer.kafka import KafkaConnection
from trainer.lineage import Lineage, apply_records, read_announcement
from trainer.signing import WRITER_HEADER, Verifier, header
from trainer.snapshot import (
    COMPLETE,
    LineageSnapshot,
    UnreadableSnapshot,
    lineage_of,
    read_completion,
    read_snapshot,
)

log = logging.getLogger(__name__)

__all__ = ["LineageLog", "load_lineages"]


class LineageLog:
    """Every adapter's lineage, kept current by reading only what was committed since.

    ``adapter-updates`` and the quarantine topic are append-only, so the
    lineages after :meth:`refresh` are those a full read would give, at the
    cost of the records committed since the previous refresh. Records this
    process committed itself (and already applied) are recognised and skipped.

    With ``latest_topic`` (the compacted snapshots, :mod:`trainer.snapshot`), the
    first refresh reads one snapshot per adapter instead of the whole history: the
    lineages then hold each adapter's newest version only, which is all a trainer
    needs. The snapshots are a cache of ``adapter-updates``, never trusted over it:
    when that topic is not complete (a pipeline from before it), when the newest
    record of its completion or of any adapter is unreadable (a tombstone, garbage, a
    record that fails verification), or when the history read after the snapshots
    does not continue them, every lineage is read from the history in full and
    :attr:`needs_snapshots` says so (the trainer then writes them again). An adapter
    with no snapshot is checked against the history before its first version, so no
    version that ``adapter-updates`` holds is announced again.
    """

    def __init__(
        self,
        kafka: KafkaConnection,
        updates_topic: str,
        quarantine_topic: str | None = None,
        latest_topic: str | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        self.kafka = kafka
        # What is trusted of adapter-updates and its snapshots (trainer.signing).
        self.verifier = verifier or Verifier()
        self.updates_topic = updates_topic
        self.quarantine_topic = quarantine_topic
        self.latest_topic = latest_topic
        self.lineages: dict[str, Lineage] = {}
        # Per learning-events partition, the last offset quarantined as unreadable: unreadable
        # records are quarantined in offset order, so one at or below it is quarantined
        # already (a rebalance re-reads from a committed offset held back by open windows).
        self.unreadable: dict[TopicPartition, int] = {}
        self.needs_snapshots = False
        # Who wrote each adapter's announcements and quarantine records: the writer header
        # (trainer.signing) of each, None for a record without one (written before it).
        self.writers: dict[str, set[str | None]] = {}
        self._reached: dict[str, dict[TopicPartition, int]] = {}
        # Where the lineages came from: None before the first refresh; "history" once read
        # in full (every later version comes with the tail); "snapshots" from the snapshot
        # topic (an adapter that has none there is then checked against the history).
        self._source: str | None = None
        self._tail_checked = False
        # The readable snapshots found at the start (held up against the history if it is
        # read in full), and where the unreadable ones lie, per key.
        self._snapshots: dict[str, LineageSnapshot] = {}
        self._unreadable_keys: dict[str, tuple[int, int]] = {}

    @property
    def stray(self) -> list[tuple[int, int]]:
        """The positions (partition, offset) of unreadable snapshot records under keys that
        are no adapter's with a version: what a completion names (there is no snapshot to
        write over them), so that they do not make every start read the history again."""
        return sorted(
            position
            for key, position in self._unreadable_keys.items()
            if (lineage := self.lineages.get(key)) is None or lineage.latest is None
        )

    async def refresh(self) -> dict[str, Lineage]:
        """Apply what was committed since the last refresh; return the lineages."""
        if self._source is None:
            self._source = "history"
            if self.latest_topic is not None:
                doubt = await self._from_snapshots(self.latest_topic)
                if doubt is None:
                    self._source = "snapshots"
                else:
                    log.log(
                        # A pipeline new, or from before the topic, has no completion yet.
                        logging.INFO if doubt == _NOT_COMPLETE else logging.WARNING,
                        "the snapshots on %s cannot be trusted (%s): reading every lineage "
                        "from %s in full, then writing the snapshots again",
                        self.latest_topic,
                        clip(doubt, 600),
                        self.updates_topic,
                    )
                    self.needs_snapshots = True
        elif self._source == "snapshots":
            unknown = sorted(a for a, lineage in self.lineages.items() if lineage.is_empty)
            if unknown:
                # No snapshot says whether adapter-updates holds versions of these (a snapshot
                # the cleaner dropped after its tombstone, say): the history does.
                log.info(
                    "%s: no snapshot on %s; reading %s in full before a first version",
                    ", ".join(unknown),
                    self.latest_topic,
                    self.updates_topic,
                )
                await self._rebuild(unknown)
                return self.lineages
        updates = await self._read(self.updates_topic)
        quarantined = await self._read(self.quarantine_topic) if self.quarantine_topic else []
        if self._source == "snapshots" and not self._tail_checked:
            self._tail_checked = True
            doubt = _tail_doubt(self._snapshots, updates, self.verifier)
            if doubt is not None:
                log.warning(
                    "the snapshots on %s disagree with %s (%s): reading every lineage from "
                    "%s in full, then writing the snapshots again",
                    self.latest_topic,
                    self.updates_topic,
                    clip(doubt, 600),
                    self.updates_topic,
                )
                self.needs_snapshots = True
                await self._rebuild()
                return self.lineages
        apply_records(self.lineages, updates, quarantined, self.unreadable, self.verifier)
        self._report_disagreements()
        return self.lineages

    async def _from_snapshots(self, topic: str) -> str | None:
        """Start from the snapshots, and read the history only from where it ended before
        they were read: a version committed meanwhile is in both, and applied once.
        Return why the snapshots are not trusted, or None.

        Only what compaction leaves counts: the NEWEST record of each key. The topic is
        trusted only when its newest :data:`COMPLETE` record (written with every adapter's
        snapshot in one transaction) and every key's newest record are readable
        (:func:`~trainer.snapshot.read_snapshot`); an unreadable record that the completion
        names (under a key that is no adapter's) is known, and does not count."""
        ends = await committed_ends(self.kafka, self.updates_topic)
        records, _ = await read_committed_topic(self.kafka, topic)
        newest: dict[bytes | None, ConsumerRecord[bytes, bytes]] = {}
        for record in records:  # in offset order per partition: the last one stands
            newest[record.key] = record
        doubts: list[str] = []
        known: set[tuple[int, int]] = set()
        marker = newest.pop(COMPLETE.encode(), None)
        if marker is None:
            doubts.append(_NOT_COMPLETE)
        else:
            try:
                known = set(read_completion(marker, self.verifier).unreadable)
            except UnreadableSnapshot as exc:
                doubts.append(f"the completion record at {_at(marker)} is {exc}")
        for key, record in newest.items():
            name = key.decode(errors="replace") if key is not None else "(no key)"
            try:
                snapshot = read_snapshot(record, self.verifier)
            except UnreadableSnapshot as exc:
                self._unreadable_keys[name] = (record.partition, record.offset)
                if (record.partition, record.offset) not in known:
                    doubts.append(f"the newest snapshot of {name}, at {_at(record)}, is {exc}")
                continue
            self._snapshots[snapshot.adapter] = snapshot
        if doubts:
            return "; ".join(doubts)
        self.lineages.update({a: lineage_of(s) for a, s in self._snapshots.items()})
        self._reached[self.updates_topic] = ends
        return None

    async def _rebuild(self, unknown: list[str] | None = None) -> None:
        """Every lineage again from the whole history (and quarantine): adapter-updates is
        the source of truth, and what disagrees with it is said in one line."""
        empty = [a for a, lineage in self.lineages.items() if lineage.is_empty]
        self.lineages.clear()
        self._reached.pop(self.updates_topic, None)
        if self.quarantine_topic is not None:
            self._reached.pop(self.quarantine_topic, None)
        self._source = "history"
        updates = await self._read(self.updates_topic)
        quarantined = await self._read(self.quarantine_topic) if self.quarantine_topic else []
        apply_records(self.lineages, updates, quarantined, self.unreadable, self.verifier)
        missing = [a for a in unknown or () if a in self.lineages and self.lineages[a].version]
        if missing:
            self.needs_snapshots = True
        self._report_disagreements(missing)
        for adapter in empty:
            self.lineages.setdefault(adapter, Lineage(adapter))

    def _report_disagreements(self, missing: list[str] | None = None) -> None:
        """Once the history is read in full: where the snapshots read at the start (or their
        absence, ``missing``) disagree with it, one line; adapter-updates wins."""
        if self._source != "history" or not (self._snapshots or missing):
            return
        differ = [
            f"{a}: no snapshot, adapter-updates v{self.lineages[a].version}" for a in missing or ()
        ]
        for adapter, snapshot in sorted(self._snapshots.items()):
            said = snapshot.update
            lineage = self.lineages.get(adapter)
            holds = lineage.version if lineage is not None else 0
            if lineage is None or holds < said.version:
                differ.append(f"{adapter}: snapshot v{said.version}, adapter-updates v{holds}")
                continue
            first = lineage.updates[0].version
            if said.version >= first:
                theirs = lineage.updates[said.version - first]
                if theirs.sha256 != said.sha256:
                    differ.append(
                        f"{adapter} v{said.version}: snapshot sha256 {said.sha256[:12]}…, "
                        f"adapter-updates {theirs.sha256[:12]}…"
                    )
        self._snapshots = {}
        if differ:
            self.needs_snapshots = True
            log.warning(
                "adapter-updates and the snapshots on %s disagree; adapter-updates wins: %s",
                self.latest_topic,
                clip("; ".join(differ), 600),
            )

    async def _read(self, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
        records, reached = await read_committed_topic(self.kafka, topic, self._reached.get(topic))
        self._reached[topic] = reached
        if topic in (self.updates_topic, self.quarantine_topic):
            for record in records:
                if record.key is not None:
                    writer = header(record, WRITER_HEADER)
                    self.writers.setdefault(record.key.decode(errors="replace"), set()).add(
                        writer.decode(errors="replace") if writer is not None else None
                    )
        return records


_NOT_COMPLETE = "no completion record"


def _at(record: ConsumerRecord[bytes, bytes]) -> str:
    return f"{record.topic}[{record.partition}]@{record.offset}"


def _tail_doubt(
    snapshots: dict[str, LineageSnapshot],
    updates: list[ConsumerRecord[bytes, bytes]],
    verifier: Verifier,
) -> str | None:
    """Why the announcements committed since the snapshots' read (``updates``) do not
    continue them, or None.

    Every version of an adapter committed after that read began is in ``updates``; the
    snapshot's own version too if any older one is. So an adapter's versions there start
    at its snapshot's next version, or include the snapshot's version, with its sha256."""
    found: dict[str, list[AdapterUpdate]] = {}
    for record in sorted(updates, key=lambda r: (r.partition, r.offset)):
        update = read_announcement(record, verifier)
        if update is not None:
            found.setdefault(update.adapter, []).append(update)
    doubts = []
    for adapter, tail in sorted(found.items()):
        snapshot = snapshots.get(adapter)
        said = snapshot.update.version if snapshot is not None else 0
        first = min(u.version for u in tail)
        same = [u for u in tail if u.version == said]
        if first > said + 1:
            doubts.append(f"{adapter}: snapshot v{said}, adapter-updates continues at v{first}")
        elif first <= said and not same:
            doubts.append(f"{adapter}: snapshot v{said}, adapter-updates has no v{said}")
        elif snapshot is not None and same and same[0].sha256 != snapshot.update.sha256:
            doubts.append(f"{adapter} v{said}: the snapshot's sha256 is not adapter-updates'")
    return "; ".join(doubts) or None


async def load_lineages(
    kafka: KafkaConnection,
    updates_topic: str,
    quarantine_topic: str | None = None,
    verifier: Verifier | None = None,
) -> dict[str, Lineage]:
    """Every adapter's lineage from the committed announcements (and quarantine records)
    that ``verifier`` trusts."""
    return await LineageLog(kafka, updates_topic, quarantine_topic, verifier=verifier).refresh()
