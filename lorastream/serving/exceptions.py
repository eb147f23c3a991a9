"""Errors of the serving stage::

LorastreamError
└── ServingError                 serve cannot go on as asked
    ├── ServeUrlError            --url is no http(s) URL with a host
    ├── ServeClash               another serve already serves that server
    └── BackendError             the inference server's API, with its URL and the call
        ├── BackendUnavailable   unreachable, timed out or 5xx: worth retrying
        └── BackendRefused       a 4xx that no retry will change
            └── BackendFull      the server holds as many adapters as it may
"""

from __future__ import annotations

from schemas.errors import LorastreamError

__all__ = [
    "BackendError",
    "BackendFull",
    "BackendRefused",
    "BackendUnavailable",
    "ServeClash",
    "ServeUrlError",
    "ServingError",
]


class ServingError(LorastreamError):
    """The serving stage cannot go on as asked."""


class BackendError(ServingError):
    """A call to the inference server failed; the message names the server and the call."""

    retriable = False

    def __init__(self, url: str, doing: str, reason: str) -> None:
        self.url = url
        self.doing = doing
        self.reason = reason
        super().__init__(self._message())

    def _message(self) -> str:
        return f"{self.doing}: the inference server at {self.url} refused: {self.reason}."


class BackendUnavailable(BackendError):
    """The server cannot be reached, timed out or answered 5xx (it may be restarting)."""

    retriable = True

    def _message(self) -> str:
        return (
            f"{self.doing}: the inference server at {self.url} is unavailable: {self.reason}. "
            "Is it running, and is --url right?"
        )


class BackendRefused(BackendError):
    """The server answered 4xx to a call that should have worked; retrying will not help."""


class ServeUrlError(ServingError):
    """``--url`` is not an http(s) URL with a host: no retry would ever reach it."""


class ServeClash(ServingError):
    """Another serve already serves the same inference server (same URL or ``--name``)."""


class BackendFull(BackendRefused):
    """The server refused a load because it holds as many adapters as it may (SGLang's
    ``--max-loaded-loras`` before it learnt to evict): unloading another makes room."""
