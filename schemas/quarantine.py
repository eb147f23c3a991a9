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

from pydantic import Field, StrictInt, StrictStr, model_validator

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
    created_at: Timestamp = Field(default_factory=_now)

    @classmethod
    def bad_record(
        cls, adapter: str | None, error: str, source: SourcePosition, value: bytes | None
    ) -> QuarantineRecord:
        """The record of one unreadable learning event, its value kept as base64."""
        encoded = base64.b64encode(value).decode() if value is not None else None
        return cls(adapter=adapter, error=error, tries=0, source=source, value_base64=encoded)

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
