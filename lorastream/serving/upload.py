"""A request body on its way through the proxy: read whole against one bound on the bytes
held across all requests, then written upstream in slices.

A body with a Content-Length reserves all of it before a byte is read; a chunked body
reserves each piece as it comes; the reservation (:class:`Share`) is given back once the
body has gone upstream. A body that would pass the bound is refused with a 503 (retry
shortly), one larger than the whole bound with a 413, one that stalls with a 408; the
refusals are in the OpenAI error shape (:func:`openai_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

__all__ = ["InFlight", "Share", "SlicedBody", "busy", "openai_error", "receive", "too_large"]

# The proxy's logger: what a refused body costs is one line of the proxy's, as before.
log = logging.getLogger("lorastream.serving.proxy")

# How much of a body goes upstream per write; see SlicedBody.
_SLICE = 256 * 1024


def openai_error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    """An error in the OpenAI shape, so that OpenAI clients show ``message``."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status)


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.3g} MiB"


class InFlight:
    """Request body bytes held by the proxy across all requests, and their bound.

    Single-threaded (one event loop), so no lock: :meth:`take` either reserves ``size``
    within ``limit`` or reserves nothing.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight byte bound must be at least 1, not {limit}")
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


class Share:
    """One request's part of :class:`InFlight`, so that it is given back once, in full."""

    def __init__(self, pool: InFlight) -> None:
        self.pool = pool
        self.size = 0

    def take(self, size: int) -> bool:
        if not self.pool.take(size):
            return False
        self.size += size
        return True

    def release(self) -> None:
        self.pool.give(self.size)
        self.size = 0


class SlicedBody(Payload):
    """A request body that goes upstream in slices, each written once the last has drained.

    aiohttp writes a bytes body in one piece, and asyncio's transport (Python 3.11) copies
    whatever the socket did not take at once into its own buffer: a second copy of a
    large body, outside the in-flight bound.
    """

    _autoclose = True  # nothing to close: the body is in memory

    def __init__(self, value: bytes | bytearray) -> None:
        super().__init__(value)
        self._view = memoryview(value)
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._view).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        view = self._view if content_length is None else self._view[:content_length]
        for start in range(0, len(view), _SLICE):
            await writer.write(view[start : start + _SLICE])


def busy(request: web.Request, pool: InFlight, wanted: int) -> web.Response:
    """503: ``wanted`` more bytes would pass the bound now; the client retries shortly."""
    log.info(
        "%s %s from %s: 503, %d more bytes would pass the in-flight bound (%d of %d bytes held)",
        request.method,
        request.path,
        request.remote,
        wanted,
        pool.held,
        pool.limit,
    )
    response = openai_error(
        503,
        f"The proxy is at its bound on in-flight request bytes "
        f"({pool.limit} bytes, {_mib(pool.limit)}, across all "
        "requests); retry shortly, or raise --proxy-max-inflight-bytes "
        "(LORASTREAM_PROXY_MAX_INFLIGHT_BYTES).",
        "proxy_busy",
    )
    response.headers["Retry-After"] = "1"
    return response


def too_large(request: web.Request, pool: InFlight, size: int) -> web.Response:
    """413: a body of ``size`` bytes or more would pass the bound even alone."""
    log.info(
        "%s %s from %s: 413, a body of %d bytes or more is above the in-flight bound of %d bytes",
        request.method,
        request.path,
        request.remote,
        size,
        pool.limit,
    )
    return openai_error(
        413,
        f"The request body ({size} bytes or more) is larger than the proxy's bound on "
        f"in-flight request bytes ({pool.limit} bytes, "
        f"{_mib(pool.limit)}); raise --proxy-max-inflight-bytes "
        "(LORASTREAM_PROXY_MAX_INFLIGHT_BYTES) to send it.",
        "request_too_large",
    )


async def receive(
    request: web.Request, share: Share, client_timeout: float
) -> bytearray | web.Response:
    """The whole request body, held in ``share``; or the response that refuses it.

    With a Content-Length the whole body is reserved before any of it is read (and
    read into one buffer of that size); a chunked body reserves each piece as it
    comes. Until then aiohttp reads no more than its small per-connection buffer.
    """
    pool = share.pool
    length = request.content_length
    if length is not None:
        if length > pool.limit:
            return too_large(request, pool, length)
        if not share.take(length):
            return busy(request, pool, length)
    body = bytearray(length or 0)
    received = 0
    try:
        while True:
            async with asyncio.timeout(client_timeout):
                chunk = await request.content.readany()
            if not chunk:
                break
            end = received + len(chunk)
            if length is None:
                if end > pool.limit:
                    return too_large(request, pool, end)
                if not share.take(len(chunk)):
                    return busy(request, pool, len(chunk))
            body[received:end] = chunk
            received = end
    except TimeoutError:
        log.info(
            "client %s sent nothing of %s %s's body for %gs (%d of %s bytes received): "
            "closing the connection",
            request.remote,
            request.method,
            request.path,
            client_timeout,
            received,
            "?" if length is None else length,
        )
        response = openai_error(
            408,
            f"The request body stalled: nothing arrived for {client_timeout:g}s "
            "(--proxy-client-timeout, LORASTREAM_PROXY_CLIENT_TIMEOUT).",
            "request_timeout",
        )
        # Sent and closed here: once the handler returns, aiohttp would linger for the
        # rest of the body, which is just what this client is not sending.
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            await response.write_eof()
        if request.transport is not None:
            request.transport.close()
        return response
    except ConnectionError:
        log.info(
            "client %s went away mid-upload of %s %s (%d of %s bytes received)",
            request.remote,
            request.method,
            request.path,
            received,
            "?" if length is None else length,
        )
        # Nobody reads this; aiohttp drops it quietly on the closed connection.
        return web.Response(status=400)
    del body[received:]
    return body
