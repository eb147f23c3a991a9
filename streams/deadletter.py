"""The dead-letter record: the original bytes, and why and where they were refused.

A dead letter keeps the key and value exactly as received, so that the
record can be fixed and produced again; the reason and the source position
travel in headers, every value UTF-8:

=========================  ==========================================================
``lorastream.error``        the reason, a sentence a person can act on
``lorastream.error.type``   the document type that was expected (``GenerationResult``)
``lorastream.fields``       the blamed fields, comma-separated (``$`` = the whole document)
``lorastream.source.topic``, ``.partition``, ``.offset``, ``.timestamp``   where it was read
=========================  ==========================================================
"""

from __future__ import annotations

from schemas import KafkaPosition, SchemaError

__all__ = ["ERROR_HEADER", "dead_letter_headers", "read_dead_letter_headers"]

ERROR_HEADER = "lorastream.error"


def dead_letter_headers(
    error: SchemaError, position: KafkaPosition, timestamp_ms: int | None
) -> list[tuple[str, bytes]]:
    headers = [
        (ERROR_HEADER, str(error).encode()),
        ("lorastream.error.type", error.type_name.encode()),
        ("lorastream.fields", ",".join(field for field, _ in error.problems).encode()),
        ("lorastream.source.topic", position.topic.encode()),
        ("lorastream.source.partition", str(position.partition).encode()),
        ("lorastream.source.offset", str(position.offset).encode()),
    ]
    if timestamp_ms is not None:
        headers.append(("lorastream.source.timestamp", str(timestamp_ms).encode()))
    return headers


def read_dead_letter_headers(headers: object) -> dict[str, str]:
    """The lorastream headers of a dead letter, decoded, for tools and tests."""
    pairs = headers.items() if isinstance(headers, dict) else headers
    return {
        key: value.decode() if isinstance(value, bytes | bytearray) else str(value)
        for key, value in pairs  # type: ignore[attr-defined]
        if key.startswith("lorastream.")
    }
