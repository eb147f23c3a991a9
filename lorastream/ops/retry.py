"""Retrying a quarantined window: its learning events published again.

:func:`retry_quarantined` re-publishes the events of a quarantined window,
keyed by adapter, in one transaction. The trainer trains them as new events: a
quarantined window marks its offsets handled but not its event ids trained
(``trainer.lineage.Lineage.record_quarantine``), and the events come back at
new offsets. What it cannot do is refused, one line each: a truncated record
(its events were left out), an unreadable event quarantined alone (no events),
events that some version already trained (the trainer would skip them all), a
window whose retry was quarantined again (retry that record instead).

The lineages are read as the trainer reads them (``trainer.history``). Functions
return data and print nothing; ``lorastream.cli.inspect`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from lorastream.ops.inspect import InspectError, QuarantineEntry, read_quarantine
from schemas import KafkaPosition, LearningEvent, Topics, encode, window_text
from trainer.history import load_lineages
from trainer.kafka import KafkaConnection, kafka_errors
from trainer.lineage import existing
from trainer.signing import Verifier

__all__ = [
    "Republished",
    "RetryRefused",
    "RetryReport",
    "refusal",
    "retry_quarantined",
    "retry_transactional_id",
]


class RetryRefused(InspectError):
    """A quarantine record that cannot be retried; the message says why and what to do."""


@dataclass(frozen=True)
class Republished:
    """A quarantined window whose events went back to the learning events."""

    quarantined: KafkaPosition
    adapter: str
    event_ids: list[str]
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    already_trained: int = 0

    @property
    def where(self) -> str:
        return window_text(self.topic, self.partition, self.first_offset, self.last_offset)


@dataclass
class RetryReport:
    republished: list[Republished] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def retry_transactional_id(topic_prefix: str, adapter: str) -> str:
    """One per adapter: a retry killed inside its transaction is aborted by the next one."""
    return f"{topic_prefix}lorastream-retry-{adapter}"


def _window_text(entry: QuarantineEntry) -> str:
    assert entry.record is not None and entry.record.window is not None
    w = entry.record.window
    return str(w)


def _quarantined_again(
    entry: QuarantineEntry, entries: list[QuarantineEntry]
) -> QuarantineEntry | None:
    """A later quarantined window of the same adapter holding some of ``entry``'s events."""
    assert entry.record is not None and entry.record.window is not None
    ids = set(entry.record.window.event_ids)
    for other in entries:
        record = other.record
        if (
            other is entry
            or record is None
            or record.window is None
            or record.truncated
            or record.adapter != entry.record.adapter
            or not ids.intersection(record.window.event_ids)
        ):
            continue
        # The quarantine topic is keyed by adapter, so an adapter's records share a partition.
        a, b = entry.position, other.position
        later = (
            b.offset > a.offset
            if a.partition == b.partition
            else (record.created_at > entry.record.created_at)
        )
        if later:
            return other
    return None


def refusal(
    entry: QuarantineEntry, trained: dict[str, int], entries: list[QuarantineEntry]
) -> str | None:
    """Why ``entry`` cannot be retried, in one line, or None.

    ``trained`` maps each event id that some version of the adapter trained to that
    version; ``entries`` are every quarantine record, to find a retry quarantined again.
    """
    where = str(entry.position)
    record = entry.record
    if record is None:
        return (
            f"{where} is not a quarantine record this version can read ({entry.unreadable}); "
            "there are no events to re-publish"
        )
    if record.window is None:
        source = record.source
        return (
            f"{where} is not a window of events but one unreadable learning event (read at "
            f"{source.topic}[{source.partition}]@{source.offset}), quarantined alone: there "
            "are no events to re-publish; its raw value is in value_base64 "
            "(`lorastream quarantine list --json`)"
            if source is not None
            else f"{where} holds no window of events; there are no events to re-publish"
        )
    window = record.window
    if record.truncated:
        return (
            f"{where} is truncated: its window's {window.size} events were left out (the whole "
            f"record would have been {record.original_size} bytes); the events lie at "
            f"{_window_text(entry)} while that topic retains them"
        )
    if record.adapter is None:
        return f"{where} names no adapter; its events cannot be keyed"
    again = _quarantined_again(entry, entries)
    if again is not None:
        return (
            f"{where}: its events came back and were quarantined again at {again.position} "
            f"({_window_text(again)}); retry that one instead"
        )
    ids = set(window.event_ids)
    if ids and ids.issubset(trained):
        shown = ", ".join(f"v{v}" for v in sorted({trained[i] for i in ids}))
        return (
            f"{where} needs no retry: all {len(ids)} of its events are trained, in "
            f"{record.adapter} {shown} (retried already, or delivered again); the trainer "
            "would skip them"
        )
    return None


async def _trained_ids(
    kafka: KafkaConnection,
    topic: str,
    adapters: set[str],
    verifier: Verifier | None = None,
) -> dict[str, dict[str, int]]:
    """Per adapter, the event ids its announced versions trained, each to its version, read
    as the trainer reads its lineages (once every open transaction has ended, trusting
    what ``verifier`` trusts)."""
    lineages = await load_lineages(kafka, topic, None, verifier=verifier)
    return {
        adapter: {
            event_id: update.version
            for update in lineages[adapter].updates
            for event_id in update.window.event_ids
        }
        if adapter in lineages
        else {}
        for adapter in adapters
    }


async def _publish(
    kafka: KafkaConnection,
    topic: str,
    transactional_id: str,
    windows: list[tuple[QuarantineEntry, list[LearningEvent], int]],
) -> list[Republished]:
    """Send every window's events keyed by adapter, all in one transaction."""
    producer = AIOKafkaProducer(
        transactional_id=transactional_id,
        enable_idempotence=True,
        acks="all",
        **kafka.client_kwargs(),
    )
    done: list[Republished] = []
    try:
        with kafka_errors(kafka.servers, f"re-publishing to {topic}"):
            await producer.start()
            sent = []
            async with producer.transaction():
                for _entry, events, _ in windows:
                    futures = [
                        await producer.send(topic, key=e.adapter.encode(), value=encode(e))
                        for e in events
                    ]
                    sent.append(futures)
            for (entry, events, already), futures in zip(windows, sent, strict=True):
                metadata = [await f for f in futures]
                done.append(
                    Republished(
                        entry.position,
                        events[0].adapter,
                        [e.id for e in events],
                        topic,
                        metadata[0].partition,
                        min(m.offset for m in metadata),
                        max(m.offset for m in metadata),
                        already,
                    )
                )
    finally:
        await producer.stop()
    return done


async def retry_quarantined(
    kafka: KafkaConnection,
    topics: Topics,
    topic_prefix: str,
    *,
    position: tuple[int, int] | None = None,
    adapter: str | None = None,
    verifier: Verifier | None = None,
) -> RetryReport:
    """Re-publish the events of the quarantined window at ``position`` (partition, offset)
    of the quarantine topic, or of every quarantined window of ``adapter``.

    One record that cannot be retried raises :class:`RetryRefused`; for an adapter, those
    that cannot are listed in the report's ``refused`` and the others go, unless none can.
    """
    if (position is None) == (adapter is None):
        raise InspectError("name one quarantine record (--partition and --offset) or --adapter")
    entries = [e async for e in read_quarantine(kafka, topics.quarantine)]
    if position is not None:
        chosen = [
            e for e in entries if (e.position.partition, e.position.offset) == tuple(position)
        ]
        if not chosen:
            raise InspectError(
                f"there is no quarantine record at {topics.quarantine}[{position[0]}]@"
                f"{position[1]}; `lorastream quarantine list` shows them"
            )
    else:
        chosen = [e for e in entries if e.adapter == adapter]
        if not chosen:
            quarantined = {e.adapter for e in entries if e.adapter is not None}
            raise InspectError(
                f"adapter {adapter} has nothing in {topics.quarantine}; "
                + existing(adapter or "", quarantined, "the adapters it holds")
            )
    names = {e.adapter for e in chosen if e.adapter is not None}
    trained = await _trained_ids(kafka, topics.adapter_updates, names, verifier)
    report = RetryReport()
    ready: list[tuple[QuarantineEntry, list[LearningEvent], int]] = []
    for entry in chosen:
        why = refusal(entry, trained.get(entry.adapter or "", {}), entries)
        if why is not None:
            if position is not None:
                raise RetryRefused(why)
            report.refused.append(why)
            continue
        assert entry.record is not None and entry.adapter is not None
        events = entry.record.events
        ready.append((entry, events, sum(e.id in trained[entry.adapter] for e in events)))
    if not ready:
        raise RetryRefused(
            f"none of the {len(chosen)} quarantine record(s) of adapter {adapter} can be "
            "retried: " + "; ".join(report.refused)
        )
    owner = ready[0][0].adapter
    assert owner is not None
    report.republished = await _publish(
        kafka, topics.learning_events, retry_transactional_id(topic_prefix, owner), ready
    )
    return report
