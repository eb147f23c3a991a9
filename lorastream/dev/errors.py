"""The dev room's one exception, in a module of its own so that every service module
(broker, TLS/SCRAM, S3Proxy, the Maven fetch) can raise it without importing another."""

from __future__ import annotations

from schemas.errors import LorastreamError

__all__ = ["BrokerError"]


class BrokerError(LorastreamError):
    """The local broker could not be assembled, started or stopped."""
