"""The three documents of the wire contract, as typed, immutable models.

``GenerationResult`` is what upstream systems produce; it is validated
strictly (unknown fields are rejected, so that a misspelt ``baseline`` is an
error instead of a silent ROUGE of 0). ``LearningEvent`` and
``AdapterUpdate`` are produced by lorastream itself; readers tolerate fields
added by newer versions. Every document carries ``schema_version``; version 1
is the only one this code reads. ``schemas.quarantine`` builds the fourth
document, ``QuarantineRecord``, from the same parts.

The JSON Schema files in ``schemas/json/`` state the same rules for producers
in other languages; ``tests/schemas/test_json_schema.py`` holds the two
against each other.

A GenerationResult is bounded (see ``schemas.limits``): its ``metadata`` nests
at most :data:`~schemas.limits.MAX_METADATA_DEPTH` levels, and it weighs at most
:data:`~schemas.limits.MAX_RESULT_BYTES` as encoded JSON. So every valid result
encodes without error, and the LearningEvent made from it fits in a Kafka record.
"""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    model_validator,
)

from schemas.codec import ENCODED_BYTES, encode
from schemas.limits import MAX_METADATA_DEPTH, MAX_RESULT_BYTES

__all__ = [
    "ADAPTER_PATTERN",
    "SCHEMA_VERSION",
    "AdapterUpdate",
    "GeneralEvalSpec",
    "GenerationResult",
    "LearningEvent",
    "LoraSpec",
    "RehearsalSpec",
    "SegmentEval",
    "SourcePosition",
    "WindowSpec",
    "window_text",
]

SCHEMA_VERSION = 1
ADAPTER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def _rfc3339_string(value: Any) -> Any:
    # pydantic would also take a bare number of seconds; the contract says RFC 3339.
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 date-time string, such as 2026-01-31T12:00:00Z")
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339_string)]
AdapterName = Annotated[
    StrictStr,
    Field(pattern=ADAPTER_PATTERN, description="Names files, so only these characters."),
]
FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]
Offset = Annotated[StrictInt, Field(ge=0)]


def _supported_version(version: int) -> int:
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"version {version} is not supported by this lorastream, which reads version "
            f"{SCHEMA_VERSION}"
        )
    return version


SchemaVersion = Annotated[StrictInt, AfterValidator(_supported_version)]


def _shallow(metadata: dict[str, Any]) -> dict[str, Any]:
    # orjson refuses to write more than 254 levels, and nothing downstream needs many:
    # a bound stated in the contract turns a crash at encode time into a clear refusal.
    if _deeper_than(metadata, MAX_METADATA_DEPTH):
        raise ValueError(
            f"nests more than {MAX_METADATA_DEPTH} levels deep (objects and arrays, metadata "
            f"itself being level 1); at most {MAX_METADATA_DEPTH} are allowed"
        )
    return metadata


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects and arrays more than ``limit`` levels deep.

    Iterative, so no depth overflows Python's stack; it stops at ``limit + 1``
    levels, so a structure that refers to itself ends too.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list | tuple):
                if depth == limit:
                    return True
                stack.append((child, depth + 1))
    return False


Metadata = Annotated[dict[str, Any], AfterValidator(_shallow)]


class _Document(BaseModel):
    model_config = ConfigDict(frozen=True, allow_inf_nan=False, extra="ignore")


class GenerationResult(_Document):
    """One generation by an upstream inference system, to be scored."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False, extra="forbid")

    schema_version: SchemaVersion = SCHEMA_VERSION
    id: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    adapter: AdapterName = "default"
    prompt: StrictStr
    response: StrictStr
    baseline: StrictStr | None = None
    entropy_delta: FiniteFloat | None = None
    entropy_before: FiniteFloat | None = None
    entropy_after: FiniteFloat | None = None
    created_at: Timestamp | None = None
    metadata: Metadata | None = None

    @model_validator(mode="after")
    def _entropy_is_known(self) -> GenerationResult:
        pair = (self.entropy_before, self.entropy_after)
        if (pair[0] is None) != (pair[1] is None):
            missing = "entropy_after" if pair[1] is None else "entropy_before"
            raise ValueError(
                f"entropy_before and entropy_after come as a pair; {missing} is missing"
            )
        if self.entropy_delta is None and pair[0] is None:
            raise ValueError(
                "one of entropy_delta, or the pair entropy_before and entropy_after, is required"
            )
        if self.entropy_delta is None and not math.isfinite(self.effective_entropy_delta):
            raise ValueError("entropy_after - entropy_before overflows to a non-finite number")
        return self

    @model_validator(mode="after")
    def _fits(self, info: ValidationInfo) -> GenerationResult:
        # Both the bytes as produced (when decoded from them) and lorastream's own
        # encoding count: the latter is what the LearningEvent copies, and it can be
        # the longer one (every field written, numbers such as 1e15 spelt out).
        produced = (info.context or {}).get(ENCODED_BYTES) or 0
        size = produced
        if produced <= MAX_RESULT_BYTES:
            try:
                size = max(produced, len(encode(self)))
            except orjson.JSONEncodeError as exc:  # Python-built values that JSON cannot hold
                raise ValueError(f"cannot be encoded as JSON: {exc}") from exc
        if size > MAX_RESULT_BYTES:
            raise ValueError(
                f"is {size} bytes as encoded JSON; a GenerationResult may be at most "
                f"{MAX_RESULT_BYTES} bytes: keep large data elsewhere and refer to it"
            )
        return self

    @property
    def effective_entropy_delta(self) -> float:
        """``entropy_delta`` as given, else ``entropy_after - entropy_before``.

        The difference is taken on the numbers as written (decimal), so that
        ``2.15 - 2.3`` is ``-0.15`` exactly rather than ``-0.15000000000000036``:
        a threshold of 0.15 must mean what the producer reads in its own data.
        """
        if self.entropy_delta is not None:
            return self.entropy_delta
        assert self.entropy_before is not None and self.entropy_after is not None
        return float(Decimal(repr(self.entropy_after)) - Decimal(repr(self.entropy_before)))


class SourcePosition(_Document):
    """Where a document was read: the Kafka topic, partition and offset."""

    topic: StrictStr
    partition: Annotated[StrictInt, Field(ge=0)]
    offset: Offset


class LearningEvent(_Document):
    """A scored generation that qualified for training."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    id: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    adapter: AdapterName
    prompt: StrictStr
    response: StrictStr
    baseline: StrictStr | None = None
    rouge_score: Annotated[FiniteFloat, Field(ge=0.0, le=1.0)]
    entropy_delta: FiniteFloat
    is_breakthrough: StrictBool
    timestamp: Timestamp
    source: SourcePosition
    metadata: Metadata | None = None


class LoraSpec(_Document):
    """The LoRA hyper-parameters a version was trained with."""

    r: Annotated[StrictInt, Field(ge=1)]
    alpha: Annotated[FiniteFloat | StrictInt, Field(gt=0)]
    target_modules: list[StrictStr]
    dropout: Annotated[FiniteFloat, Field(ge=0.0, lt=1.0)] = 0.0


class SegmentEval(_Document):
    """A version measured on the held-out events of one segment of its adapter's stream.

    A segment is the producer's ``metadata.segment`` label, or else the range of
    versions whose windows brought the events (``v1-v8``, ``v9-v16`` ...).
    """

    segment: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    loss: FiniteFloat
    base_loss: FiniteFloat
    events: Annotated[StrictInt, Field(ge=1)]


class GeneralEvalSpec(_Document):
    """A version measured on the general set (LORASTREAM_GENERAL_EVAL), beside the base model.

    The set is the same for every adapter: an adapter that learns its task while getting
    worse at everything else shows as ``loss`` above ``base_loss``. ``sha256`` is the
    file's, so a reader knows which set two numbers share.
    """

    loss: FiniteFloat
    base_loss: FiniteFloat
    events: Annotated[StrictInt, Field(ge=1)]
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]


class RehearsalSpec(_Document):
    """The earlier events of its adapter that a version's step mixed into its window.

    They are a sample of the parent version's rehearsal buffer; ``digest`` is the sha256
    hex of their ids joined by newlines, in sample order, so a replay or a resumed
    trainer can show that it rehearsed the same ones.
    """

    events: Annotated[StrictInt, Field(ge=0)]
    digest: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]


class EvalSpec(_Document):
    """A version measured on its adapter's held-out events, which no window trains on."""

    loss: FiniteFloat  # the version's mean response-token loss on the held-out events
    base_loss: FiniteFloat  # the base model's (no adapter) on the same events
    events: Annotated[StrictInt, Field(ge=1)]
    # The same measure per segment of the stream the events came from, in order of first
    # appearance in the set: what the forgetting matrix is read from. None in
    # announcements made before segments existed.
    segments: list[SegmentEval] | None = None
    # The segment this version's window trained in: its row of the forgetting matrix.
    segment: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = None


def window_text(topic: str, partition: int, first_offset: int, last_offset: int) -> str:
    """How a window is written everywhere a person reads it: ``topic[p]@first..last``."""
    return f"{topic}[{partition}]@{first_offset}..{last_offset}"


class StepGroup(_Document):
    """The adapters whose windows went through one forward and backward together
    (``LORASTREAM_ADAPTERS_PER_STEP``), in the step's order, this version's own among
    them, and each one's rows as token counts: the batch's shape, which a replay
    rebuilds so that its step is this one bit for bit."""

    adapters: Annotated[list[AdapterName], Field(min_length=2)]
    # Per adapter, per row: [prompt tokens, response tokens].
    rows: list[list[tuple[Annotated[StrictInt, Field(ge=0)], Annotated[StrictInt, Field(ge=1)]]]]

    @model_validator(mode="after")
    def _consistent(self) -> StepGroup:
        if len(set(self.adapters)) != len(self.adapters):
            raise ValueError("adapters names an adapter twice")
        if len(self.rows) != len(self.adapters):
            raise ValueError(f"rows has {len(self.rows)} lists for {len(self.adapters)} adapters")
        if any(not rows for rows in self.rows):
            raise ValueError("every adapter of a group has at least one row")
        return self

    def named(self, old: str, new: str) -> StepGroup:
        """The same group with ``old`` called ``new`` (a replay's own adapter)."""
        return StepGroup(adapters=[new if a == old else a for a in self.adapters], rows=self.rows)


class WindowSpec(_Document):
    """The learning events a version was trained on."""

    topic: StrictStr
    partition: Annotated[StrictInt, Field(ge=0)]
    first_offset: Offset
    last_offset: Offset
    size: Annotated[StrictInt, Field(ge=1)]
    event_ids: list[StrictStr]
    # The trainer's window size (LORASTREAM_WINDOW_SIZE) when this window closed: views
    # show the trainer's figure, never their own setting's. ``size`` is smaller for a
    # partial window (LORASTREAM_MAX_WAIT_SECONDS). None in announcements made before it.
    full_size: Annotated[StrictInt, Field(ge=1)] | None = None
    # Stepped together with other adapters' windows: who, and the batch's shape. None for a
    # window stepped alone, and in announcements made before groups existed.
    group: StepGroup | None = None

    @model_validator(mode="after")
    def _consistent(self) -> WindowSpec:
        if self.last_offset < self.first_offset:
            raise ValueError("last_offset is before first_offset")
        if len(self.event_ids) != self.size:
            raise ValueError(f"size is {self.size} but event_ids holds {len(self.event_ids)} ids")
        return self

    def __str__(self) -> str:
        return window_text(self.topic, self.partition, self.first_offset, self.last_offset)


class AdapterUpdate(_Document):
    """The announcement of one trained adapter version."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    adapter: AdapterName
    version: Annotated[StrictInt, Field(ge=1)]
    parent_version: Annotated[StrictInt, Field(ge=1)] | None
    base_model: StrictStr
    base_model_fingerprint: StrictStr | None = None
    uri: StrictStr
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
    # The sha256 of the version's manifest.json (every file's size and sha256): the
    # announcement covers every file a reader loads. None in announcements from before it.
    manifest_sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    format: Literal["peft"] = "peft"
    lora: LoraSpec
    window: WindowSpec
    train_loss: FiniteFloat
    created_at: Timestamp
    eval: EvalSpec | None = None  # null while the adapter has no held-out events
    # null unless the trainer has a general set (LORASTREAM_GENERAL_EVAL)
    general_eval: GeneralEvalSpec | None = None
    # what the step rehearsed (LORASTREAM_REHEARSAL); null while rehearsal is off
    rehearsal: RehearsalSpec | None = None

    @model_validator(mode="after")
    def _lineage(self) -> AdapterUpdate:
        expected = None if self.version == 1 else self.version - 1
        if self.parent_version != expected:
            raise ValueError(
                f"parent_version must be {expected} for version {self.version}, "
                f"not {self.parent_version}"
            )
        return self
