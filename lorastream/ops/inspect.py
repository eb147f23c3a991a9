"""What the pipeline refused, read back: dead letters, quarantine records, and retries.

Every read here is a group-less ``read_committed`` consumer that goes from the
beginning of a topic to its end as it is now, partition by partition in offset
order, and stops: nothing is followed and no group's offsets move. Functions
return data and print nothing; ``lorastream.cli.inspect`` prints.

Retrying a quarantined window (:func:`retry_quarantined`) re-publishes its
learning events, keyed by adapter, in one transaction. The trainer trains them
as new events: a quarantined window marks its offsets handled but not its event
ids trained (``trainer.lineage.Lineage.record_quarantine``), and the events come
back at new offsets. What it cannot do is refused, one line each: a truncated
record (its events were left out), an unreadable event quarantined alone (no
events), events that some version already trained (the trainer would skip them
all), a window whose retry was quarantined again (retry that record instead).

Kafka is reached through the trainer's readers (``trainer.kafka``, ``trainer.history``),
which load no PyTorch: one place turns client errors into one line, and the lineages
are read as the trainer reads them.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from schemas import (
    DeadLetterHeaders,
    KafkaPosition,
    LearningEvent,
    QuarantineRecord,
    SchemaError,
    Topics,
    decode,
    encode,
    window_text,
)
from schemas.errors import LorastreamError
from schemas.limits import clip
from trainer.exceptions import TrainerError
from trainer.history import load_lineages, topic_partitions
from trainer.kafka import kafka_errors, reader
from trainer.signing import Verifier

__all__ = [
    "DeadLetterEntry",
    "ExportReport",
    "InspectError",
    "QuarantineEntry",
    "Republished",
    "RetryRefused",
    "RetryReport",
    "export_dead_letters",
    "read_dead_letters",
    "read_quarantine",
    "read_topic",
    "refusal",
    "retry_quarantined",
    "retry_transactional_id",
]


class InspectError(LorastreamError):
    """A topic to read does not exist, or a request names nothing that is there."""


class RetryRefused(InspectError):
    """A quarantine record that cannot be retried; the message says why and what to do."""


# ── reading ──────────────────────────────────────────────────────────────────


async def read_topic(
    servers: str,
    topic: str,
    client_options: dict[str, Any] | None = None,
    limit: int | None = None,
) -> AsyncGenerator[ConsumerRecord[bytes, bytes], None]:
    """The committed records of ``topic`` as of now (at most ``limit``), partition by
    partition in offset order; then it stops."""
    if limit is not None and limit <= 0:
        return
    given = 0
    async with reader(servers, f"reading {topic}", client_options) as consumer:
        try:
            tps = await topic_partitions(consumer, topic, servers)
        except TrainerError as exc:  # the one it raises: no such topic
            raise InspectError(f"{exc}, or check --topic-prefix (LORASTREAM_TOPIC_PREFIX)") from exc
        # read_committed: the last stable offset; an open transaction is not waited for.
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=500, max_records=500)
                for record in batch.get(tp, []):
                    if record.offset >= ends[tp]:
                        break
                    yield record
                    given += 1
                    if limit is not None and given >= limit:
                        return


def _position(record: ConsumerRecord[bytes, bytes]) -> KafkaPosition:
    return KafkaPosition(record.topic, record.partition, record.offset)


def _as_json(position: KafkaPosition) -> dict[str, Any]:
    return {"topic": position.topic, "partition": position.partition, "offset": position.offset}


def _text_or_base64(raw: bytes | None) -> tuple[str | None, str | None]:
    """``(text, "utf-8")``, ``(base64, "base64")``, or ``(None, None)`` for no bytes."""
    if raw is None:
        return None, None
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode(), "base64"


# ── dead letters ─────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class DeadLetterEntry:
    """One record of the dead-letter topic: where it lies, the refused record's key and
    value as kept, and the headers that say why; ``unreadable`` when the headers are not
    those of a lorastream dead letter (then ``headers`` is None)."""

    position: KafkaPosition
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: DeadLetterHeaders | None
    unreadable: str | None = None

    @classmethod
    def of(cls, record: ConsumerRecord[bytes, bytes]) -> DeadLetterEntry:
        pairs = list(record.headers or ())
        headers: DeadLetterHeaders | None = None
        unreadable = None
        try:
            headers = DeadLetterHeaders.from_kafka(pairs)
        except SchemaError as exc:
            ours = any(name.startswith("lorastream.") for name, _ in pairs)
            unreadable = exc.details() if ours else "no lorastream.* headers: not a dead letter"
        timestamp = (
            record.timestamp if record.timestamp is not None and record.timestamp >= 0 else None
        )
        return cls(_position(record), timestamp, record.key, record.value, headers, unreadable)

    @property
    def reason(self) -> str | None:
        return self.headers.error if self.headers else None

    @property
    def fields(self) -> list[str]:
        if self.headers is None or not self.headers.fields:
            return []
        return self.headers.fields.split(",")

    @property
    def source(self) -> KafkaPosition | None:
        """Where the refused record was read (its topic, partition and offset)."""
        h = self.headers
        return KafkaPosition(h.source_topic, h.source_partition, h.source_offset) if h else None

    @property
    def truncated(self) -> bool:
        return self.headers is not None and self.headers.truncated

    @property
    def value_cut(self) -> bool:
        return self.headers is not None and self.headers.value_size is not None

    def line(self) -> str | None:
        """The value as one line of JSON Lines, or None (see :meth:`why_not_a_line`)."""
        return None if self.why_not_a_line() else (self.value or b"").decode("utf-8")

    def why_not_a_line(self) -> str | None:
        """Why the value cannot be exported as a line to fix and produce again, or None."""
        if self.headers is None:
            return f"its headers are unreadable ({clip(self.unreadable or '', 200)})"
        if self.value is None:
            return "it has no value (a tombstone)"
        if self.value_cut:
            return (
                f"its value was cut to its first {len(self.value)} of "
                f"{self.headers.value_size} bytes; the original is at {self.source}"
            )
        try:
            text = self.value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"its value is not UTF-8 ({exc.reason} at byte {exc.start})"
        if "\n" in text or "\r" in text:
            return "its value spans several lines"
        if not text.strip():
            return "its value is empty"
        return None

    def to_json(self) -> dict[str, Any]:
        """The machine-readable form: text where the bytes are UTF-8, else base64."""
        h = self.headers
        key, key_encoding = _text_or_base64(self.key)
        value, value_encoding = _text_or_base64(self.value)
        source = None
        if h is not None:
            where = KafkaPosition(h.source_topic, h.source_partition, h.source_offset)
            source = {**_as_json(where), "timestamp": h.source_timestamp}
        original = None
        if h is not None and h.truncated:
            original = {
                "key_size": h.key_size,
                "key_sha256": h.key_sha256,
                "value_size": h.value_size,
                "value_sha256": h.value_sha256,
            }
        return {
            "position": _as_json(self.position),
            "timestamp": self.timestamp_ms,
            "reason": self.reason,
            "error_type": h.error_type if h else None,
            "fields": self.fields,
            "source": source,
            "headers_unreadable": self.unreadable,
            "key": key,
            "key_encoding": key_encoding,
            "value": value,
            "value_encoding": value_encoding,
            "value_bytes": None if self.value is None else len(self.value),
            "truncated": self.truncated,
            "original": original,
        }


async def read_dead_letters(
    servers: str,
    topic: str,
    client_options: dict[str, Any] | None = None,
    limit: int | None = None,
) -> AsyncGenerator[DeadLetterEntry, None]:
    """Every dead letter of ``topic`` as of now (at most ``limit``), decoded; never raises
    for a record's content."""
    async for record in read_topic(servers, topic, client_options, limit):
        yield DeadLetterEntry.of(record)


@dataclass
class ExportReport:
    """What :func:`export_dead_letters` wrote: ``lines[i]`` is line ``i + 1``'s dead letter."""

    path: Path
    lines: list[DeadLetterEntry] = field(default_factory=list)
    skipped: list[tuple[DeadLetterEntry, str]] = field(default_factory=list)


async def export_dead_letters(
    servers: str,
    topic: str,
    path: Path,
    client_options: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> ExportReport:
    """Write the original value of every dead letter that can be one line as JSON Lines.

    Those that cannot (no value, a value cut, not UTF-8, several lines, empty) are
    skipped and listed with the reason. The file appears whole, or not at all when
    there is no line to write; an existing one is kept unless ``overwrite``.
    """
    if path.exists() and not overwrite:
        raise InspectError(f"{path} exists; choose another file, or pass --force to replace it")
    report = ExportReport(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8", newline="\n") as handle:
            async for entry in read_dead_letters(servers, topic, client_options):
                why = entry.why_not_a_line()
                if why is not None:
                    report.skipped.append((entry, why))
                    continue
                handle.write(f"{entry.line()}\n")
                report.lines.append(entry)
            handle.flush()
            os.fsync(handle.fileno())
        if report.lines:
            os.replace(temporary, path)
    except OSError as exc:
        raise InspectError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        temporary.unlink(missing_ok=True)
    return report


# ── quarantine ───────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class QuarantineEntry:
    """One record of the quarantine topic; ``unreadable`` when it is not a QuarantineRecord
    this version can read (then ``record`` is None)."""

    position: KafkaPosition
    key: bytes | None
    record: QuarantineRecord | None
    unreadable: str | None = None

    @classmethod
    def of(cls, raw: ConsumerRecord[bytes, bytes]) -> QuarantineEntry:
        position = _position(raw)
        try:
            return cls(position, raw.key, decode(raw.value, QuarantineRecord, position=position))
        except SchemaError as exc:
            return cls(position, raw.key, None, exc.details())

    @property
    def kind(self) -> str:
        """``window`` (a window that failed its tries), ``event`` (one unreadable learning
        event, quarantined alone) or ``unreadable`` (not a quarantine record)."""
        if self.record is None:
            return "unreadable"
        return "window" if self.record.window is not None else "event"

    @property
    def adapter(self) -> str | None:
        return self.record.adapter if self.record is not None else None

    def to_json(self) -> dict[str, Any]:
        r = self.record
        window = r.window.model_dump(mode="json") if r is not None and r.window else None
        source = r.source.model_dump(mode="json") if r is not None and r.source else None
        return {
            "position": _as_json(self.position),
            "kind": self.kind,
            "adapter": self.adapter,
            "window": window,
            "source": source,
            "events": len(r.events) if r is not None else 0,
            "tries": r.tries if r is not None else None,
            "error": r.error if r is not None else None,
            "truncated": r.truncated if r is not None else False,
            "original_size": r.original_size if r is not None else None,
            "original_sha256": r.original_sha256 if r is not None else None,
            "value_bytes": _kept_bytes(r),
            "created_at": r.created_at.isoformat() if r is not None else None,
            "unreadable": self.unreadable,
        }


def _kept_bytes(record: QuarantineRecord | None) -> int | None:
    """The size of an unreadable event's value as kept in the record."""
    if record is None or record.value_base64 is None:
        return None
    try:
        return len(base64.b64decode(record.value_base64))
    except binascii.Error:
        return None


async def read_quarantine(
    servers: str, topic: str, client_options: dict[str, Any] | None = None
) -> AsyncGenerator[QuarantineEntry, None]:
    """Every record of the quarantine topic as of now, decoded; never raises for content."""
    async for raw in read_topic(servers, topic, client_options):
        yield QuarantineEntry.of(raw)


# ── retry ────────────────────────────────────────────────────────────────────


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
    servers: str,
    topic: str,
    adapters: set[str],
    client_options: dict[str, Any] | None,
    verifier: Verifier | None = None,
) -> dict[str, dict[str, int]]:
    """Per adapter, the event ids its announced versions trained, each to its version, read
    as the trainer reads its lineages (once every open transaction has ended, trusting
    what ``verifier`` trusts)."""
    lineages = await load_lineages(servers, topic, None, client_options, verifier=verifier)
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
    servers: str,
    topic: str,
    transactional_id: str,
    windows: list[tuple[QuarantineEntry, list[LearningEvent], int]],
    client_options: dict[str, Any] | None,
) -> list[Republished]:
    """Send every window's events keyed by adapter, all in one transaction."""
    producer = AIOKafkaProducer(
        bootstrap_servers=servers,
        transactional_id=transactional_id,
        enable_idempotence=True,
        acks="all",
        **(client_options or {}),
    )
    done: list[Republished] = []
    try:
        with kafka_errors(servers, f"re-publishing to {topic}"):
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
    servers: str,
    topics: Topics,
    topic_prefix: str,
    *,
    position: tuple[int, int] | None = None,
    adapter: str | None = None,
    client_options: dict[str, Any] | None = None,
    verifier: Verifier | None = None,
) -> RetryReport:
    """Re-publish the events of the quarantined window at ``position`` (partition, offset)
    of the quarantine topic, or of every quarantined window of ``adapter``.

    One record that cannot be retried raises :class:`RetryRefused`; for an adapter, those
    that cannot are listed in the report's ``refused`` and the others go, unless none can.
    """
    if (position is None) == (adapter is None):
        raise InspectError("name one quarantine record (--partition and --offset) or --adapter")
    entries = [e async for e in read_quarantine(servers, topics.quarantine, client_options)]
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
            raise InspectError(f"adapter {adapter} has nothing in {topics.quarantine}")
    names = {e.adapter for e in chosen if e.adapter is not None}
    trained = await _trained_ids(servers, topics.adapter_updates, names, client_options, verifier)
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
        servers,
        topics.learning_events,
        retry_transactional_id(topic_prefix, owner),
        ready,
        client_options,
    )
    return report
