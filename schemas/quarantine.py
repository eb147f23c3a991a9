"""The quarantine record: a window (or one unreadable record) that could not train.

The trainer writes one to the quarantine topic, keyed by adapter name, in the
same transaction that moves its offsets past what it quarantines, so nothing
is dropped silently: the events (or the raw bytes) and the error are there to
inspect, fix and replay. Readers tolerate fields added by newer versions.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Annotated

from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

from schemas.codec import encode
from schemas.limits import KEPT_PAYLOAD_BYTES, MAX_OUTPUT_BYTES, clip, sha256_hex
from schemas.models import (
    SCHEMA_VERSION,
    LearningEvent,
    SchemaVersion,
    SourcePosition,
    Timestamp,
    WindowSpec,
    _Document,
)

__all__ = ["BASE64_PATTERN", "QuarantineRecord"]

# Standard base64 with padding, as base64.b64encode writes it; "" for an empty value.
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"

_EITHER = (
    "a quarantine record holds either a window that failed its tries (window) "
    "or one unreadable record (source)"
)


def _now() -> datetime:
    return datetime.now(tz=UTC)


class QuarantineRecord(_Document):
    """Why and what was quarantined: ``window`` for a window, ``source`` for a bad record.

    A window that failed ``tries`` (at least 1) training steps carries its
    ``window`` and its ``events``, in the window's order. A learning-events
    record that could not be read carries its ``source`` position and its raw
    value as ``value_base64`` (``None`` for a tombstone), and ``tries`` is 0.
    """

    schema_version: SchemaVersion = SCHEMA_VERSION
    adapter: StrictStr | None
    error: StrictStr
    tries: Annotated[StrictInt, Field(ge=0)]
    window: WindowSpec | None = None
    events: list[LearningEvent] = Field(default_factory=list)
    source: SourcePosition | None = None
    value_base64: Annotated[StrictStr, Field(pattern=BASE64_PATTERN)] | None = None
    truncated: StrictBool = False
    original_size: Annotated[StrictInt, Field(ge=0)] | None = None
    original_sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    created_at: Timestamp = Field(default_factory=_now)

    @field_validator("error", mode="before")
    @classmethod
    def _bounded_error(cls, value: object) -> object:
        return clip(value) if isinstance(value, str) else value

    def bounded(self, keep: int = KEPT_PAYLOAD_BYTES) -> QuarantineRecord:
        """The bounded form: a window without its events, or a record's value cut to ``keep``
        bytes; ``original_size`` and ``original_sha256`` describe what was left out (the
        encoded record, or the value), and the Kafka position finds it in the source topic."""
        if self.truncated:
            return self
        if self.window is not None:
            full = encode(self)
            return self.model_copy(
                update={
                    "events": [],
                    "truncated": True,
                    "original_size": len(full),
                    "original_sha256": sha256_hex(full),
                }
            )
        value = base64.b64decode(self.value_base64) if self.value_base64 is not None else b""
        return self.model_copy(
            update={
                "value_base64": base64.b64encode(value[:keep]).decode(),
                "truncated": True,
                "original_size": len(value),
                "original_sha256": sha256_hex(value),
            }
        )

    def encodings(self, limit: int = MAX_OUTPUT_BYTES) -> list[bytes]:
        """The ways to write this record, largest first, each at most ``limit`` bytes: the
        full record, the bounded one, the bounded one with no payload (the last is kept even
        over ``limit``: there is nothing smaller). A writer whose topic refuses one tries the
        next."""
        forms: list[bytes] = []
        for form in (self, self.bounded(), self.bounded(keep=0)):
            raw = encode(form)
            if len(raw) <= limit and (not forms or len(raw) < len(forms[-1])):
                forms.append(raw)
        return forms or [raw]

    @classmethod
    def bad_record(
        cls, adapter: str | None, error: str, source: SourcePosition, value: bytes | None
    ) -> QuarantineRecord:
        """The record of one unreadable learning event, its value kept as base64."""
        encoded = base64.b64encode(value).decode() if value is not None else None
        return cls(adapter=adapter, error=error, tries=0, source=source, value_base64=encoded)

    @model_validator(mode="after")
    def _truncation_is_described(self) -> QuarantineRecord:
        described = self.original_size is not None and self.original_sha256 is not None
        if self.truncated and not described:
            raise ValueError("truncated is true, so original_size and original_sha256 are required")
        if not self.truncated and (
            self.original_size is not None or self.original_sha256 is not None
        ):
            raise ValueError("original_size and original_sha256 describe a truncated record only")
        return self

    @model_validator(mode="after")
    def _window_or_source(self) -> QuarantineRecord:
        if self.window is not None and self.source is not None:
            raise ValueError(f"window and source are both set; {_EITHER}")
        if self.window is not None:
            self._check_window(self.window)
        elif self.source is not None:
            self._check_bad_record()
        else:
            raise ValueError(f"neither window nor source is set; {_EITHER}")
        return self

    def _check_window(self, window: WindowSpec) -> None:
        if self.tries < 1:
            raise ValueError(
                f"tries is {self.tries}, but a quarantined window failed 1 try or more"
            )
        if self.truncated:
            if self.events:
                raise ValueError(
                    "events holds events, but a truncated window record leaves them out "
                    "(they lie at window's offsets)"
                )
            return
        ids = [event.id for event in self.events]
        if len(ids) != len(window.event_ids):
            raise ValueError(
                f"events holds {len(ids)} events but window.event_ids {len(window.event_ids)} "
                "ids; events are the window's events, in order"
            )
        for i, (got, expected) in enumerate(zip(ids, window.event_ids, strict=True)):
            if got != expected:
                raise ValueError(
                    f"events[{i}].id is {got!r} but window.event_ids[{i}] is {expected!r}; "
                    "events are the window's events, in order"
                )
        if self.value_base64 is not None:
            raise ValueError(
                "value_base64 is set with window; only an unreadable record (source) keeps its bytes"
            )

    def _check_bad_record(self) -> None:
        if self.tries != 0:
            raise ValueError(
                f"tries is {self.tries}, but an unreadable record (source) is never tried: "
                "tries must be 0"
            )
        if self.events:
            raise ValueError(
                f"events holds {len(self.events)} events, but an unreadable record (source) "
                "has none"
            )
