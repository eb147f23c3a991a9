"""The wire contract of lorastream: every type on a topic, its JSON Schema file, codec, topics.

The documents (``GenerationResult``, ``LearningEvent``, ``AdapterUpdate``,
``QuarantineRecord``) are JSON record values; ``DeadLetterHeaders`` are the
Kafka headers of a dead letter, whose key and value are the original bytes
(``DeadLetter`` builds one, bounded). ``schemas.limits`` holds the sizes the
contract bounds.

This package imports nothing else of lorastream's, so producers and consumers
in Python can depend on it alone::

    from schemas import GenerationResult, encode, decode

    raw = encode(GenerationResult(id="r1", prompt="2+2?", response="4", entropy_delta=-0.3))
    assert decode(raw, GenerationResult).id == "r1"
"""

from schemas.codec import decode, decode_obj, encode
from schemas.deadletter import (
    DeadLetter,
    DeadLetterHeaders,
    dead_letter_headers,
    read_dead_letter_headers,
)
from schemas.errors import KafkaPosition, LorastreamError, SchemaError
from schemas.models import (
    ADAPTER_PATTERN,
    SCHEMA_VERSION,
    AdapterUpdate,
    EvalSpec,
    GeneralEvalSpec,
    GenerationResult,
    LearningEvent,
    LoraSpec,
    RehearsalSpec,
    SegmentEval,
    SourcePosition,
    StepGroup,
    WindowSpec,
    window_text,
)
from schemas.quarantine import QuarantineRecord
from schemas.resources import schema_document, schema_path
from schemas.topics import Topics

__all__ = [
    "ADAPTER_PATTERN",
    "SCHEMA_VERSION",
    "AdapterUpdate",
    "DeadLetter",
    "DeadLetterHeaders",
    "EvalSpec",
    "GeneralEvalSpec",
    "GenerationResult",
    "KafkaPosition",
    "LearningEvent",
    "LoraSpec",
    "LorastreamError",
    "QuarantineRecord",
    "RehearsalSpec",
    "SchemaError",
    "SegmentEval",
    "SourcePosition",
    "StepGroup",
    "Topics",
    "WindowSpec",
    "dead_letter_headers",
    "decode",
    "decode_obj",
    "encode",
    "read_dead_letter_headers",
    "schema_document",
    "schema_path",
    "window_text",
]
