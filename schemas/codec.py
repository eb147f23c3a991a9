"""Bytes on the wire <-> typed documents, with orjson.

``decode`` never lets a third-party error escape: bad UTF-8, bad JSON, a
wrong type or a broken rule all become :class:`SchemaError` naming the field
and what is wrong with it, and the Kafka position or file line when given.
``encode`` writes compact UTF-8 JSON with RFC 3339 timestamps (``Z`` for UTC);
``decode(encode(doc)) == doc`` for every valid document.

Errors stay small whatever the input: a bad value is quoted up to
:data:`~schemas.limits.MAX_INPUT_REPR_CHARS` characters, field names and
messages are clipped, and at most :data:`~schemas.limits.MAX_PROBLEMS` problems
are listed, so that a reason fits in a Kafka header.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from schemas.errors import KafkaPosition, SchemaError
from schemas.limits import MAX_INPUT_REPR_CHARS, MAX_PROBLEMS, TRUNCATION_MARKER, clip

__all__ = ["ENCODED_BYTES", "decode", "decode_obj", "encode", "problems_of"]

ENCODED_BYTES = "encoded_bytes"
"""The validation-context key under which ``decode`` passes the size of the bytes it read."""

_MAX_FIELD_CHARS = 200
_MAX_MESSAGE_CHARS = 600
# What other JSON writers emit for non-finite floats (Python's json, JavaScript's
# String(), numpy); orjson reports each only as an unexpected character.
_NON_FINITE = re.compile(r"-?(?:nan|inf(?:inity)?)(?![A-Za-z0-9_])", re.IGNORECASE)

D = TypeVar("D", bound=BaseModel)


def encode(document: BaseModel) -> bytes:
    """Serialise a document as compact UTF-8 JSON, fields in declaration order."""
    return orjson.dumps(document.model_dump(mode="python"), option=orjson.OPT_UTC_Z)


def decode(
    raw: bytes | bytearray | memoryview | str | None,
    type_: type[D],
    *,
    position: KafkaPosition | None = None,
    line: int | None = None,
) -> D:
    """Parse and validate one document of ``type_``; raise :class:`SchemaError` if it is bad."""
    name = type_.__name__
    if raw is None:
        raise SchemaError(
            name, [("$", "the record has no value (a tombstone)")], position=position, line=line
        )
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(
            name, [("$", f"not valid JSON: {_json_problem(exc)}")], position=position, line=line
        ) from exc
    size = len(raw.encode()) if isinstance(raw, str) else len(raw)
    return decode_obj(obj, type_, position=position, line=line, encoded_bytes=size)


def _json_problem(exc: orjson.JSONDecodeError) -> str:
    """orjson's message; for a NaN or Infinity literal, one that names it, at the same place."""
    doc, pos = exc.doc, exc.pos
    # orjson points past the sign of -Infinity ("no digit after sign").
    start = pos - 1 if 0 < pos <= len(doc) and doc[pos - 1] == "-" else pos
    found = _NON_FINITE.match(doc, start) if isinstance(doc, str) else None
    if found is None:
        return str(exc)
    return (
        f"{found.group()} is not allowed in JSON, which has no NaN or Infinity (write a "
        f"finite number, or leave the field out): line {exc.lineno} column {exc.colno} "
        f"(char {exc.pos})"
    )


def decode_obj(
    obj: Any,
    type_: type[D],
    *,
    position: KafkaPosition | None = None,
    line: int | None = None,
    encoded_bytes: int | None = None,
) -> D:
    """Validate an already parsed JSON value as a document of ``type_``.

    ``encoded_bytes``, the size of the JSON it was parsed from, lets a type that
    bounds its size (``GenerationResult``) judge the bytes as they were produced.
    """
    name = type_.__name__
    if not isinstance(obj, dict):
        kind = type(obj).__name__ if obj is not None else "null"
        problems = [("$", f"must be a JSON object, not {kind}")]
        raise SchemaError(name, problems, position=position, line=line)
    context = {ENCODED_BYTES: encoded_bytes} if encoded_bytes is not None else None
    try:
        return type_.model_validate(obj, context=context)
    except ValidationError as exc:
        raise SchemaError(name, problems_of(exc), position=position, line=line) from exc


def problems_of(exc: ValidationError) -> list[tuple[str, str]]:
    """``(field, message)`` for each of pydantic's errors, phrased for a person.

    Bounded whatever the input: at most :data:`~schemas.limits.MAX_PROBLEMS` of
    them (then one ``$`` problem saying how many more there were), field names
    and messages clipped, a bad value quoted up to ``MAX_INPUT_REPR_CHARS`` characters.
    """
    errors = exc.errors(include_url=False)
    problems: list[tuple[str, str]] = []
    for error in errors[:MAX_PROBLEMS]:
        loc = clip(".".join(str(part) for part in error["loc"]), _MAX_FIELD_CHARS) or "$"
        kind = error["type"]
        message = error["msg"]
        if kind == "missing":
            message = "is required"
        elif kind == "extra_forbidden":
            message = "is not a field of this document (misspelt? put extra data under metadata)"
        elif kind == "string_pattern_mismatch":
            pattern = error.get("ctx", {}).get("pattern", "")
            message = f"{_brief(error['input'])} does not match {pattern}"
        elif kind in ("value_error", "assertion_error"):
            message = message.removeprefix("Value error, ")
        problems.append((loc, clip(message, _MAX_MESSAGE_CHARS)))
    if len(errors) > MAX_PROBLEMS:
        problems.append(("$", f"{len(errors) - MAX_PROBLEMS} more problems are not listed"))
    return problems


def _brief(value: Any, limit: int = MAX_INPUT_REPR_CHARS) -> str:
    """``repr(value)``, cut to about ``limit`` characters with a marker saying how long it was."""
    if isinstance(value, str | bytes) and len(value) > limit:
        # Slice before repr: a value of megabytes is never copied whole into a message.
        unit = "chars" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}{TRUNCATION_MARKER} ({len(value)} {unit})"
    return clip(repr(value), limit)
