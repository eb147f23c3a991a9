"""What the pipeline refused, read back: dead letters and quarantine records.

Every read here is a group-less ``read_committed`` consumer that goes from the
beginning of a topic to its end as it is now, partition by partition in offset
order, and stops: nothing is followed and no group's offsets move. Functions
return data and print nothing; ``lorastream.cli.inspect`` prints. Retrying a
quarantined window is :mod:`lorastream.ops.retry`.

Kafka is reached through the trainer's one committed reader (``trainer.committed``),
which loads no PyTorch: one place turns client errors into one line.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.structs import ConsumerRecord

from schemas import (
    DeadLetterHeaders,
    KafkaPosition,
    QuarantineRecord,
    SchemaError,
    decode,
)
from schemas.errors import LorastreamError
from schemas.limits import clip
from trainer.committed import stream_committed
from trainer.exceptions import TrainerError
from trainer.kafka import KafkaConnection

__all__ = [
    "DeadLetterEntry",
    "ExportReport",
    "InspectError",
    "QuarantineEntry",
    "export_dead_letters",
    "read_dead_letters",
    "read_quarantine",
    "read_topic",
]


class InspectError(LorastreamError):
    """A topic to read does not exist, or a request names nothing that is there."""


# ── reading ──────────────────────────────────────────────────────────────────


async def read_topic(
    kafka: KafkaConnection,
    topic: str,
    limit: int | None = None,
) -> AsyncGenerator[ConsumerRecord[bytes, bytes], None]:
    """The committed records of ``topic`` as of now (at most ``limit``), partition by
    partition in offset order; then it stops."""
    if limit is not None and limit <= 0:
        return
    given = 0
    # Up to the last stable offset: an open transaction is not waited for.
    records = stream_committed(kafka, topic, settle=False)
    try:
        async with aclosing(records):
            async for record in records:
                yield record
                given += 1
                if limit is not None and given >= limit:
                    return
    except TrainerError as exc:  # the one it raises: no such topic
        raise InspectError(f"{exc}, or check --topic-prefix (LORASTREAM_TOPIC_PREFIX)") from exc


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
    kafka: KafkaConnection,
    topic: str,
    limit: int | None = None,
) -> AsyncGenerator[DeadLetterEntry, None]:
    """Every dead letter of ``topic`` as of now (at most ``limit``), decoded; never raises
    for a record's content."""
    # Closed here, not left to the loop's shutdown: it closes every pending generator at
    # once, read_topic's inner one twice ("already running", a traceback on `| head`).
    async with aclosing(read_topic(kafka, topic, limit)) as records:
        async for record in records:
            yield DeadLetterEntry.of(record)


@dataclass
class ExportReport:
    """What :func:`export_dead_letters` wrote: ``lines[i]`` is line ``i + 1``'s dead letter."""

    path: Path
    lines: list[DeadLetterEntry] = field(default_factory=list)
    skipped: list[tuple[DeadLetterEntry, str]] = field(default_factory=list)


async def export_dead_letters(
    kafka: KafkaConnection,
    topic: str,
    path: Path,
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
            async for entry in read_dead_letters(kafka, topic):
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
    kafka: KafkaConnection, topic: str
) -> AsyncGenerator[QuarantineEntry, None]:
    """Every record of the quarantine topic as of now, decoded; never raises for content."""
    async with aclosing(read_topic(kafka, topic)) as records:  # as read_dead_letters'
        async for raw in records:
            yield QuarantineEntry.of(raw)
