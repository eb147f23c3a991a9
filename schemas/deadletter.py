"""The dead-letter headers: why a record was refused and where it was read.

A dead letter keeps the refused record's key and value exactly as received,
so that it can be fixed and produced again; the reason and the source
position travel in Kafka headers, every value a UTF-8 string:

===============================  ==========================================================
``lorastream.error``              the reason, a sentence a person can act on
``lorastream.error.type``         the document type that was expected (``GenerationResult``)
``lorastream.fields``             the blamed fields, comma-separated (``$`` = the whole document)
``lorastream.source.topic``       the topic it was read from
``lorastream.source.partition``   its partition, a decimal integer
``lorastream.source.offset``      its offset, a decimal integer
``lorastream.source.timestamp``   its timestamp in ms since the epoch, if it had one
===============================  ==========================================================

Headers whose names this version does not know are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
)

from schemas.codec import problems_of
from schemas.errors import KafkaPosition, SchemaError

__all__ = [
    "DECIMAL_PATTERN",
    "DeadLetterHeaders",
    "KafkaHeaders",
    "dead_letter_headers",
    "read_dead_letter_headers",
]

DECIMAL_PATTERN = r"^(0|[1-9][0-9]*)$"
_SIGNED_DECIMAL_PATTERN = r"^(0|-?[1-9][0-9]*)$"
_PREFIX = "lorastream."

HeaderValue = bytes | bytearray | memoryview | str | None
KafkaHeaders = Mapping[str, HeaderValue] | Iterable[tuple[str, HeaderValue]]


def _decimal(pattern: str) -> BeforeValidator:
    def parse(value: Any) -> Any:
        # Decimal strings on the wire; int() alone would also take " 1", "+1" and "1_0".
        if isinstance(value, str):
            if re.fullmatch(pattern, value) is None:
                raise ValueError(f"{value!r} is not a decimal integer such as 42")
            return int(value)
        return value

    return BeforeValidator(parse)


NonNegative = Annotated[StrictInt, Field(ge=0), _decimal(DECIMAL_PATTERN)]
Text = Annotated[StrictStr, Field(min_length=1)]


class DeadLetterHeaders(BaseModel):
    """The lorastream headers of one dead letter; each field's alias is its header's name.

    Validating by alias takes the header values as strings (the numbers as
    decimal strings), as :meth:`from_kafka` does; Python code may also build
    one by field name, with the numbers as ints.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    error: Annotated[Text, Field(alias="lorastream.error")]
    error_type: Annotated[Text, Field(alias="lorastream.error.type")]
    fields: Annotated[StrictStr, Field(alias="lorastream.fields")]
    source_topic: Annotated[Text, Field(alias="lorastream.source.topic")]
    source_partition: Annotated[NonNegative, Field(alias="lorastream.source.partition")]
    source_offset: Annotated[NonNegative, Field(alias="lorastream.source.offset")]
    # As Kafka gave it, so it may be negative: -1 is how Kafka writes "no timestamp".
    source_timestamp: Annotated[
        StrictInt | None,
        Field(alias="lorastream.source.timestamp"),
        _decimal(_SIGNED_DECIMAL_PATTERN),
    ] = None

    @classmethod
    def from_kafka(cls, headers: KafkaHeaders) -> DeadLetterHeaders:
        """Parse and validate a dead letter's Kafka headers.

        Raises :class:`SchemaError` naming each header that is missing, null,
        not UTF-8, repeated, or has a bad value. Other headers are ignored.
        """
        names = {field.alias for field in cls.model_fields.values()}
        seen: set[str] = set()
        values: dict[str, str] = {}
        problems: dict[str, str] = {}
        for name, value in _pairs(headers):
            if name not in names:
                continue
            if name in seen:
                problems[name] = "appears more than once; a dead letter has one of each"
                continue
            seen.add(name)
            if value is None:
                problems[name] = "has no value (null); every header holds a string"
                continue
            try:
                values[name] = _text(value) or ""
            except UnicodeDecodeError as exc:
                problems[name] = f"is not UTF-8 ({exc.reason} at byte {exc.start})"
        for name in problems:
            values.pop(name, None)
        try:
            parsed = cls.model_validate(values)
        except ValidationError as exc:
            for name, message in problems_of(exc):
                problems.setdefault(name, message)
        if problems:
            raise SchemaError(cls.__name__, list(problems.items()))
        return parsed

    def to_kafka(self) -> list[tuple[str, bytes]]:
        """The headers to send, in declaration order, without an absent timestamp."""
        return [
            (name, str(value).encode())
            for name, value in self.model_dump(by_alias=True).items()
            if value is not None
        ]


def dead_letter_headers(
    error: SchemaError, position: KafkaPosition, timestamp_ms: int | None
) -> list[tuple[str, bytes]]:
    """The headers of the dead letter of a record refused with ``error``."""
    return _validated(
        {
            "error": str(error),
            "error_type": error.type_name,
            "fields": ",".join(field for field, _ in error.problems),
            "source_topic": position.topic,
            "source_partition": position.partition,
            "source_offset": position.offset,
            "source_timestamp": timestamp_ms,
        }
    ).to_kafka()


def read_dead_letter_headers(headers: KafkaHeaders) -> dict[str, str]:
    """The ``lorastream.*`` headers of a dead letter, decoded leniently, for tools and tests.

    Nothing is validated (see :meth:`DeadLetterHeaders.from_kafka` for that):
    bytes that are not UTF-8 are replaced, and of a repeated header the last wins.
    """
    return {
        name: _text(value, errors="replace") or ""
        for name, value in _pairs(headers)
        if name.startswith(_PREFIX)
    }


def _validated(values: Mapping[str, Any]) -> DeadLetterHeaders:
    try:
        return DeadLetterHeaders.model_validate(values)
    except ValidationError as exc:
        raise SchemaError(DeadLetterHeaders.__name__, problems_of(exc)) from exc


def _pairs(headers: KafkaHeaders) -> Iterable[tuple[str, HeaderValue]]:
    return headers.items() if isinstance(headers, Mapping) else headers


def _text(value: HeaderValue, errors: str = "strict") -> str | None:
    if value is None or isinstance(value, str):
        return value
    return bytes(value).decode("utf-8", errors=errors)
