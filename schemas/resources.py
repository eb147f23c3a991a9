"""Where the JSON Schema files lie, for tools and for producers in other languages."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import orjson

__all__ = ["SCHEMA_FILES", "schema_document", "schema_path"]

_DIR = Path(__file__).parent / "json"
SCHEMA_FILES = {
    "GenerationResult": "generation-result.schema.json",
    "LearningEvent": "learning-event.schema.json",
    "AdapterUpdate": "adapter-update.schema.json",
    "QuarantineRecord": "quarantine-record.schema.json",
    "DeadLetterHeaders": "dead-letter-headers.schema.json",
}


def schema_path(type_name: str) -> Path:
    """The JSON Schema (draft 2020-12) file of one type that travels on a topic."""
    return _DIR / SCHEMA_FILES[type_name]


@cache
def schema_document(type_name: str) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(schema_path(type_name).read_bytes())
    return doc
