"""Errors of the scoring stage."""

from __future__ import annotations

from schemas.errors import LorastreamError

__all__ = ["StreamsError"]


class StreamsError(LorastreamError):
    """The scoring stage could not be configured or started."""
