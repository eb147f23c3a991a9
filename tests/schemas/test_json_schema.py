"""The JSON Schema files and the Python types state the same contract."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel
from referencing import Registry, Resource

from schemas import (
    AdapterUpdate,
    DeadLetterHeaders,
    GenerationResult,
    LearningEvent,
    QuarantineRecord,
    SchemaError,
    decode,
)
from schemas.resources import SCHEMA_FILES, schema_document, schema_path
from tests.schemas.cases import (
    DEAD_LETTER_ACCEPTS,
    DEAD_LETTER_REJECTS,
    GENERATION_ACCEPTS,
    GENERATION_REJECTS,
    QUARANTINE_ACCEPTS,
    QUARANTINE_REJECTS,
)
from tests.schemas.test_models import _adapter_update, _learning_event

TYPES: dict[str, type[BaseModel]] = {
    "GenerationResult": GenerationResult,
    "LearningEvent": LearningEvent,
    "AdapterUpdate": AdapterUpdate,
    "QuarantineRecord": QuarantineRecord,
    "DeadLetterHeaders": DeadLetterHeaders,
}

# The files refer to each other by $id, as a producer's validator would load them.
REGISTRY: Registry = Registry().with_resources(
    (schema_document(name)["$id"], Resource.from_contents(schema_document(name)))
    for name in SCHEMA_FILES
)


def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(
        schema_document(name),
        registry=REGISTRY,
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


def test_every_type_has_a_schema_file() -> None:
    assert set(TYPES) == set(SCHEMA_FILES)


@pytest.mark.parametrize("name", sorted(SCHEMA_FILES))
def test_schema_file_is_valid_draft_2020_12(name: str) -> None:
    doc = schema_document(name)
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert doc["title"] == name
    Draft202012Validator.check_schema(doc)
    assert schema_path(name).is_file()


def _properties_and_required(model: type[BaseModel]) -> tuple[set[str], set[str]]:
    """The names a document uses for the model's fields (aliases where set), and the required."""
    names = {name: field.alias or name for name, field in model.model_fields.items()}
    required = {names[name] for name, field in model.model_fields.items() if field.is_required()}
    return set(names.values()), required


def _resolved(node: dict[str, Any]) -> dict[str, Any]:
    """An object schema, through an array's ``items`` and a ``$ref`` to another file."""
    if node.get("type") == "array":
        node = node["items"]
    if "oneOf" in node:  # an optional object: null, or the object
        node = next(option for option in node["oneOf"] if option.get("type") == "object")
    if "$ref" in node:
        node = REGISTRY.resolver().lookup(node["$ref"]).contents
    return node


def test_dead_letter_header_names_are_the_aliases() -> None:
    aliases = {field.alias for field in DeadLetterHeaders.model_fields.values()}
    assert aliases == set(schema_document("DeadLetterHeaders")["properties"])
    assert all(alias and alias.startswith("lorastream.") for alias in aliases)


@pytest.mark.parametrize("name", sorted(SCHEMA_FILES))
def test_fields_and_required_fields_agree(name: str) -> None:
    doc = schema_document(name)
    properties, required = _properties_and_required(TYPES[name])
    assert set(doc["properties"]) == properties
    assert set(doc["required"]) == required


@pytest.mark.parametrize(
    ("parent", "field", "model"),
    [
        ("LearningEvent", "source", "SourcePosition"),
        ("AdapterUpdate", "lora", "LoraSpec"),
        ("AdapterUpdate", "window", "WindowSpec"),
        ("AdapterUpdate", "eval", "EvalSpec"),
        ("QuarantineRecord", "window", "WindowSpec"),
        ("QuarantineRecord", "source", "SourcePosition"),
        ("QuarantineRecord", "events", "LearningEvent"),
    ],
)
def test_nested_objects_agree(parent: str, field: str, model: str) -> None:
    import schemas

    nested = _resolved(schema_document(parent)["properties"][field])
    properties, required = _properties_and_required(getattr(schemas, model))
    assert set(nested["properties"]) == properties
    assert set(nested["required"]) == required


def _verdicts(name: str, doc: Any) -> tuple[bool, bool]:
    by_schema = _validator(name).is_valid(doc)
    try:
        if name == "DeadLetterHeaders":
            # Headers are not JSON on the wire: each value is UTF-8 bytes (or null).
            DeadLetterHeaders.from_kafka(
                [(key, None if value is None else value.encode()) for key, value in doc.items()]
            )
        else:
            decode(orjson.dumps(doc), TYPES[name])
        by_python = True
    except SchemaError:
        by_python = False
    return by_schema, by_python


AGREEMENT_CASES: list[tuple[str, str, Any]] = (
    [("GenerationResult", f"reject-{i}", d) for i, d, _ in GENERATION_REJECTS]
    + [("GenerationResult", f"accept-{i}", d) for i, d in GENERATION_ACCEPTS]
    + [
        ("LearningEvent", "valid", _learning_event()),
        ("LearningEvent", "rouge-above-1", _learning_event(rouge_score=1.5)),
        ("LearningEvent", "missing-source", {**_learning_event(), "source": None}),
        ("LearningEvent", "bad-timestamp", _learning_event(timestamp="2026-01-31")),
        ("LearningEvent", "flag-not-bool", _learning_event(is_breakthrough=1)),
        ("AdapterUpdate", "valid", _adapter_update()),
        ("AdapterUpdate", "first-version", _adapter_update(version=1, parent_version=None)),
        ("AdapterUpdate", "bad-sha", _adapter_update(sha256="ABC")),
        ("AdapterUpdate", "not-peft", _adapter_update(format="bin")),
        (
            "AdapterUpdate",
            "evaluated",
            _adapter_update(eval={"loss": 1.25, "base_loss": 5.9, "events": 12}),
        ),
        ("AdapterUpdate", "eval-null", _adapter_update(eval=None)),
        (
            "AdapterUpdate",
            "eval-no-events",
            _adapter_update(eval={"loss": 1.25, "base_loss": 5.9, "events": 0}),
        ),
        (
            "AdapterUpdate",
            "eval-extra-field",
            _adapter_update(eval={"loss": 1.0, "base_loss": 5.9, "events": 3, "x": 1}),
        ),
        ("AdapterUpdate", "version-0", _adapter_update(version=0, parent_version=None)),
    ]
    + [("QuarantineRecord", f"reject-{i}", d) for i, d, _ in QUARANTINE_REJECTS]
    + [("QuarantineRecord", f"accept-{i}", d) for i, d in QUARANTINE_ACCEPTS]
    + [("DeadLetterHeaders", f"reject-{i}", d) for i, d, _ in DEAD_LETTER_REJECTS]
    + [("DeadLetterHeaders", f"accept-{i}", d) for i, d in DEAD_LETTER_ACCEPTS]
)


# Rules that JSON Schema cannot state; the schema files say so in their descriptions.
BEYOND_JSON_SCHEMA = {
    "reject-entropy-pair-overflows",
    "reject-metadata-too-deep",
    "reject-too-large",
    "reject-events-not-the-window",
    "reject-events-fewer-than-window",
    "reject-window-size-mismatch",
}


@pytest.mark.parametrize(
    ("name", "case", "doc"), [pytest.param(n, i, d, id=f"{n}-{i}") for n, i, d in AGREEMENT_CASES]
)
def test_schema_file_and_python_type_give_the_same_verdict(name: str, case: str, doc: Any) -> None:
    by_schema, by_python = _verdicts(name, doc)
    if case in BEYOND_JSON_SCHEMA:
        assert (by_schema, by_python) == (True, False)
    else:
        assert by_schema == by_python, f"JSON Schema says {by_schema}, Python says {by_python}"
