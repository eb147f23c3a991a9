"""Bytes on the wire <-> typed documents, with orjson.

``decode`` never lets a third-party error escape: bad UTF-8, bad JSON, a
wrong type or a broken rule all become :class:`SchemaError` naming the field
and what is wrong with it, and the Kafka position or file line when given.
``encode`` writes compact UTF-8 JSON with RFC 3339 timestamps (``Z`` for UTC);
``decode(encode(doc)) == doc`` for every valid document.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from schemas.errors import KafkaPosition, SchemaError

__all__ = ["decode", "decode_obj", "encode", "problems_of"]

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
            name, [("$", f"not valid JSON: {exc}")], position=position, line=line
        ) from exc
    return decode_obj(obj, type_, position=position, line=line)


def decode_obj(
    obj: Any,
    type_: type[D],
    *,
    position: KafkaPosition | None = None,
    line: int | None = None,
) -> D:
    """Validate an already parsed JSON value as a document of ``type_``."""
    name = type_.__name__
    if not isinstance(obj, dict):
        kind = type(obj).__name__ if obj is not None else "null"
        problems = [("$", f"must be a JSON object, not {kind}")]
        raise SchemaError(name, problems, position=position, line=line)
    try:
        return type_.model_validate(obj)
    except ValidationError as exc:
        raise SchemaError(name, problems_of(exc), position=position, line=line) from exc


def problems_of(exc: ValidationError) -> list[tuple[str, str]]:
    """``(field, message)`` for each of pydantic's errors, phrased for a person."""
    problems: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in error["loc"]) or "$"
        kind = error["type"]
        message = error["msg"]
        if kind == "missing":
            message = "is required"
        elif kind == "extra_forbidden":
            message = "is not a field of this document (misspelt? put extra data under metadata)"
        elif kind == "string_pattern_mismatch":
            pattern = error.get("ctx", {}).get("pattern", "")
            message = f"{error['input']!r} does not match {pattern}"
        elif kind in ("value_error", "assertion_error"):
            message = message.removeprefix("Value error, ")
        problems.append((loc, message))
    return problems
