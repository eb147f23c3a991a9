"""The quarantine record: a window (or one unreadable record) that could not train.

Written to ``learning-events.quarantine`` in the same transaction that moves
the offsets past it, so nothing is dropped silently: the events and the
error are all there to inspect, fix and replay.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from schemas import LearningEvent, SourcePosition, WindowSpec

__all__ = ["Quarantined"]


class Quarantined(BaseModel):
    """Why and what was quarantined; ``window`` for a window, ``source`` for a bad record."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = 1
    adapter: str | None
    error: str
    tries: Annotated[int, Field(ge=0)]
    window: WindowSpec | None = None
    events: list[LearningEvent] = Field(default_factory=list)
    source: SourcePosition | None = None
    value_base64: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(tz=UTC))

    @classmethod
    def bad_record(
        cls, adapter: str | None, error: str, source: SourcePosition, value: bytes | None
    ) -> Quarantined:
        encoded = base64.b64encode(value).decode() if value is not None else None
        return cls(adapter=adapter, error=error, tries=0, source=source, value_base64=encoded)
