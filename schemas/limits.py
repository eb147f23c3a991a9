"""The sizes the contract bounds, so that nothing lorastream writes can be refused by Kafka.

Kafka refuses a record over the topic's ``max.message.bytes`` (1 MiB by
default). lorastream writes three kinds of records derived from input it
does not control (learning events, dead letters, quarantine records); each
is kept under :data:`MAX_OUTPUT_BYTES` (key, value and headers together), by
refusing inputs over :data:`MAX_RESULT_BYTES` and by writing dead letters and
quarantine records in a bounded form when the full one would not fit: the
payload cut to :data:`KEPT_PAYLOAD_BYTES` with a marker, the original's size
and sha256, and its Kafka position so it can be fetched from the source.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "KEPT_PAYLOAD_BYTES",
    "MAX_INPUT_REPR_CHARS",
    "MAX_METADATA_DEPTH",
    "MAX_OUTPUT_BYTES",
    "MAX_PROBLEMS",
    "MAX_REASON_CHARS",
    "MAX_RESULT_BYTES",
    "TRUNCATION_MARKER",
    "clip",
    "record_size",
    "sha256_file",
    "sha256_hex",
]

MAX_OUTPUT_BYTES = 900_000
"""The most any record lorastream writes may weigh: key, value and headers."""

MAX_RESULT_BYTES = 512 * 1024
"""The most a GenerationResult (or a LearningEvent) may weigh, as encoded JSON."""

MAX_METADATA_DEPTH = 64
"""How deeply ``metadata`` may nest (objects and arrays), the object itself being depth 1."""

KEPT_PAYLOAD_BYTES = 64 * 1024
"""How much of an oversized payload a bounded dead letter or quarantine record keeps."""

MAX_REASON_CHARS = 2_000
"""The longest reason (error message) written in a header or a quarantine record."""

MAX_INPUT_REPR_CHARS = 100
"""The longest quotation of a bad input value in an error message."""

MAX_PROBLEMS = 20
"""The most problems one error lists; a document with more says how many it left out."""

TRUNCATION_MARKER = "…[truncated]"

# Kafka's framing of one record in a batch of one, rounded up: the batch header (61
# bytes) and the record's varints; each header adds two length varints.
_RECORD_OVERHEAD = 128
_HEADER_OVERHEAD = 10


def clip(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text``, or its head and a marker saying how long it was, within ``limit`` chars."""
    if len(text) <= limit:
        return text
    tail = f"{TRUNCATION_MARKER} ({len(text)} chars)"
    return text[: max(0, limit - len(tail))] + tail


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in blocks (an adapter file can be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_size(
    key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes | None]] = ()
) -> int:
    """What Kafka counts for one record with these parts, rounded up (never less)."""
    size = _RECORD_OVERHEAD + len(key or b"") + len(value or b"")
    for name, header_value in headers:
        size += _HEADER_OVERHEAD + len(name.encode()) + len(header_value or b"")
    return size
