"""The dead letter: the refused record, why it was refused and where it was read.

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
``lorastream.truncated``          ``1`` when the key or the value was cut (absent otherwise)
``lorastream.key.size``           the original key's size in bytes, when the key was cut
``lorastream.key.sha256``         the original key's SHA-256, hex, when the key was cut
``lorastream.value.size``         the original value's size in bytes, when the value was cut
``lorastream.value.sha256``       the original value's SHA-256, hex, when the value was cut
===============================  ==========================================================

A dead letter is bounded whatever the input, so that Kafka never refuses it:
the reason and the fields are clipped to :data:`~schemas.limits.MAX_REASON_CHARS`
characters, and when key, value and headers together would weigh more than
:data:`~schemas.limits.MAX_OUTPUT_BYTES`, the key and value keep only their
first :data:`~schemas.limits.KEPT_PAYLOAD_BYTES`; the size and SHA-256 headers
then identify the original, which the source position lets one fetch from the
source topic while it is retained.

Headers whose names this version does not know are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from schemas.codec import problems_of
from schemas.errors import KafkaPosition, SchemaError
from schemas.limits import (
    KEPT_PAYLOAD_BYTES,
    MAX_OUTPUT_BYTES,
    MAX_REASON_CHARS,
    clip,
    record_size,
    sha256_hex,
)

__all__ = [
    "DECIMAL_PATTERN",
    "DeadLetter",
    "DeadLetterHeaders",
    "KafkaHeaders",
    "dead_letter_headers",
    "read_dead_letter_headers",
]

DECIMAL_PATTERN = r"^(0|[1-9][0-9]*)$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MAX_TOPIC_CHARS = 249  # Kafka's own limit on a topic name
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


def _flag(value: Any) -> Any:
    # On the wire the flag is "1" or absent; "0", "true" and the like are refused.
    if isinstance(value, str):
        if value != "1":
            raise ValueError(f"{value[:20]!r} is not 1; the header is absent when nothing was cut")
        return True
    return value


NonNegative = Annotated[StrictInt, Field(ge=0), _decimal(DECIMAL_PATTERN)]
Text = Annotated[StrictStr, Field(min_length=1, max_length=MAX_REASON_CHARS)]
Sha256 = Annotated[StrictStr, Field(pattern=SHA256_PATTERN)]


class DeadLetterHeaders(BaseModel):
    """The lorastream headers of one dead letter; each field's alias is its header's name.

    Validating by alias takes the header values as strings (the numbers as
    decimal strings), as :meth:`from_kafka` does; Python code may also build
    one by field name, with the numbers as ints.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    error: Annotated[Text, Field(alias="lorastream.error")]
    error_type: Annotated[Text, Field(alias="lorastream.error.type")]
    fields: Annotated[StrictStr, Field(alias="lorastream.fields", max_length=MAX_REASON_CHARS)]
    source_topic: Annotated[
        Text, Field(alias="lorastream.source.topic", max_length=MAX_TOPIC_CHARS)
    ]
    source_partition: Annotated[NonNegative, Field(alias="lorastream.source.partition")]
    source_offset: Annotated[NonNegative, Field(alias="lorastream.source.offset")]
    # As Kafka gave it, so it may be negative: -1 is how Kafka writes "no timestamp".
    source_timestamp: Annotated[
        StrictInt | None,
        Field(alias="lorastream.source.timestamp"),
        _decimal(_SIGNED_DECIMAL_PATTERN),
    ] = None
    truncated: Annotated[
        StrictBool, Field(alias="lorastream.truncated"), BeforeValidator(_flag)
    ] = False
    key_size: Annotated[NonNegative | None, Field(alias="lorastream.key.size")] = None
    key_sha256: Annotated[Sha256 | None, Field(alias="lorastream.key.sha256")] = None
    value_size: Annotated[NonNegative | None, Field(alias="lorastream.value.size")] = None
    value_sha256: Annotated[Sha256 | None, Field(alias="lorastream.value.sha256")] = None

    @model_validator(mode="after")
    def _cut_is_described(self) -> DeadLetterHeaders:
        for part in ("key", "value"):
            size, digest = getattr(self, f"{part}_size"), getattr(self, f"{part}_sha256")
            if (size is None) != (digest is None):
                raise ValueError(
                    f"lorastream.{part}.size and lorastream.{part}.sha256 come as a pair; "
                    f"lorastream.{part}.{'sha256' if digest is None else 'size'} is missing"
                )
            if size is not None and not self.truncated:
                raise ValueError(
                    f"lorastream.{part}.size is set but lorastream.truncated is not; "
                    "they describe a cut"
                )
        if self.truncated and self.key_size is None and self.value_size is None:
            raise ValueError(
                "lorastream.truncated is 1 but neither lorastream.key.size nor "
                "lorastream.value.size says what was cut"
            )
        return self

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
        """The headers to send, in declaration order, without the absent ones."""
        return [
            (name, b"1" if value is True else str(value).encode())
            for name, value in self.model_dump(by_alias=True).items()
            if value is not None and value is not False
        ]


@dataclass(frozen=True)
class DeadLetter:
    """A dead letter ready to send: the refused record's key and value, and the headers.

    Build one with :meth:`refusing` (a record that broke the contract) or
    :meth:`of` (any other reason); both keep it within ``limit`` bytes as the
    module docstring describes.
    """

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def size(self) -> int:
        """What Kafka counts for this record, rounded up (see ``schemas.limits.record_size``)."""
        return record_size(self.key, self.value, self.headers)

    @property
    def truncated(self) -> bool:
        """Whether the key or the value was cut."""
        return any(name == "lorastream.truncated" for name, _ in self.headers)

    @property
    def reason(self) -> str:
        """The ``lorastream.error`` header: why the record was refused."""
        return next(value.decode() for name, value in self.headers if name == "lorastream.error")

    @classmethod
    def refusing(
        cls,
        error: SchemaError,
        key: bytes | None,
        value: bytes | None,
        position: KafkaPosition,
        timestamp_ms: int | None,
        *,
        limit: int = MAX_OUTPUT_BYTES,
    ) -> DeadLetter:
        """The dead letter of a record refused with ``error``."""
        return cls.of(
            key,
            value,
            position,
            timestamp_ms,
            reason=str(error),
            error_type=error.type_name,
            fields=[field for field, _ in error.problems],
            limit=limit,
        )

    @classmethod
    def of(
        cls,
        key: bytes | None,
        value: bytes | None,
        position: KafkaPosition,
        timestamp_ms: int | None,
        *,
        reason: str,
        error_type: str,
        fields: Iterable[str] = ("$",),
        limit: int = MAX_OUTPUT_BYTES,
    ) -> DeadLetter:
        """The dead letter of a record that could not be handled, for ``reason``.

        When key, value and headers would weigh more than ``limit`` bytes, the
        key and the value keep their first ``KEPT_PAYLOAD_BYTES`` each (``limit=0``
        cuts whatever is longer than that) and headers say what was cut.
        """
        values: dict[str, Any] = {
            "error": clip(reason) or "no reason given",
            "error_type": clip(error_type) or "unknown",
            "fields": clip(",".join(fields)),
            "source_topic": position.topic,
            "source_partition": position.partition,
            "source_offset": position.offset,
            "source_timestamp": timestamp_ms,
        }
        letter = cls(key, value, _validated(values).to_kafka())
        return letter if letter.size <= limit else letter.cut()

    def cut(self) -> DeadLetter:
        """This dead letter with its key and value cut to their first ``KEPT_PAYLOAD_BYTES``,
        and headers that say so; itself when neither is longer than that."""
        update: dict[str, Any] = {}
        key, value = self.key, self.value
        if key is not None and len(key) > KEPT_PAYLOAD_BYTES:
            update.update(truncated=True, key_size=len(key), key_sha256=sha256_hex(key))
            key = key[:KEPT_PAYLOAD_BYTES]
        if value is not None and len(value) > KEPT_PAYLOAD_BYTES:
            update.update(truncated=True, value_size=len(value), value_sha256=sha256_hex(value))
            value = value[:KEPT_PAYLOAD_BYTES]
        if not update:
            return self
        headers = DeadLetterHeaders.from_kafka(self.headers).model_dump()
        return DeadLetter(key, value, _validated({**headers, **update}).to_kafka())


def dead_letter_headers(
    error: SchemaError, position: KafkaPosition, timestamp_ms: int | None
) -> list[tuple[str, bytes]]:
    """The headers of the dead letter of a record refused with ``error`` (nothing cut)."""
    return DeadLetter.refusing(error, None, None, position, timestamp_ms).headers


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
