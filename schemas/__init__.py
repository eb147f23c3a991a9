"""The wire contract of lorastream: event types, JSON Schema files, codec, topic names.

This package imports nothing else of lorastream's, so producers and consumers
in Python can depend on it alone::

    from schemas import GenerationResult, encode, decode

    raw = encode(GenerationResult(id="r1", prompt="2+2?", response="4", entropy_delta=-0.3))
    assert decode(raw, GenerationResult).id == "r1"
"""

from schemas.codec import decode, decode_obj, encode
from schemas.errors import KafkaPosition, LorastreamError, SchemaError
from schemas.models import (
    ADAPTER_PATTERN,
    SCHEMA_VERSION,
    AdapterUpdate,
    GenerationResult,
    LearningEvent,
    LoraSpec,
    SourcePosition,
    WindowSpec,
)
from schemas.resources import schema_document, schema_path
from schemas.topics import Topics

__all__ = [
    "ADAPTER_PATTERN",
    "SCHEMA_VERSION",
    "AdapterUpdate",
    "GenerationResult",
    "KafkaPosition",
    "LearningEvent",
    "LoraSpec",
    "LorastreamError",
    "SchemaError",
    "SourcePosition",
    "Topics",
    "WindowSpec",
    "decode",
    "decode_obj",
    "encode",
    "schema_document",
    "schema_path",
]
