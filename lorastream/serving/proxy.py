"""An OpenAI-compatible proxy that gives clients one stable model name per adapter.

The serve loop loads every adapter version into the inference server under a
name it never reuses (``tutor-v3``); clients should not have to follow that.
They ask this proxy for ``"model": "tutor"`` and the request reaches the
server with ``model`` replaced by whatever ``resolve("tutor")`` returns, the
newest live version's name at that moment. Everything else passes through as
it came: other models, the base model, other paths, GET requests, bodies that
are not a JSON object — method, path, query, headers (less the hop-by-hop
ones) and body. Responses stream back chunk by chunk, so server-sent events
(``"stream": true``) reach the client as the server writes them.

A model that ``known`` recognises but ``resolve`` cannot map (an adapter with
no live version yet) gets a 503; a server that cannot be reached gets a 502;
both in the OpenAI error shape, ``{"error": {"message", "type", "param",
"code"}}``, so that OpenAI clients show the message.

The proxy shares its process with the serve loop, so what clients can make it hold is
bounded. Request bodies are read whole (the ``model`` may come last) and count against
one bound on in-flight bytes, :class:`~lorastream.serving.upload.InFlight`, across all
requests (``serving.upload``): a body reserves its
Content-Length before a byte of it is read, a chunked body reserves each piece as it
arrives, and the reservation is given back once the body has gone upstream. A request
that would pass the bound gets a 503 (try again shortly), one larger than the whole bound
a 413. A client that stalls for ``client_timeout`` seconds (before its headers are
complete, in its body, or while it takes nothing of the response) is disconnected, and a
client that goes away costs one log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from lorastream.serving.exceptions import ServingError
from lorastream.serving.upload import InFlight, Share, SlicedBody, openai_error, receive

__all__ = [
    "DEFAULT_CLIENT_TIMEOUT",
    "DEFAULT_MAX_INFLIGHT_BYTES",
    "InFlight",
    "Proxy",
    "sglang_model",
    "unreachable_reason",
]

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1: these describe one connection, not the message, so a proxy
# must not forward them. Host and Content-Length are set anew for the upstream
# request (the body may have been rewritten), and Expect is answered here: the
# proxy has read the whole body before it connects upstream.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}

# No total or read timeout: a streamed generation may run for minutes and a
# long prompt may take a while before its first token. Only connecting is
# bounded, so that a server that is down is reported quickly.
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)

# Multimodal requests carry images inline, so one body may be large; what all of them
# together may hold is bounded instead (LORASTREAM_PROXY_MAX_INFLIGHT_BYTES).
DEFAULT_MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
DEFAULT_CLIENT_TIMEOUT = 30.0

# A body is parsed only when it may be a JSON object; matching (rather than lstrip) keeps
# a large body from being copied just to look at its first byte.
_JSON_OBJECT = re.compile(rb"[ \t\r\n]*\{")


def sglang_model(base: str, name: str) -> str:
    """The ``model`` SGLang expects for LoRA adapter ``name`` on base model ``base``.

    SGLang's OpenAI server selects a loaded adapter with ``"<base>:<adapter>"``;
    a bare adapter name is taken as a (missing) base model.
    """
    return f"{base}:{name}"


def unreachable_reason(exc: BaseException) -> str:
    """Why a request never reached the server, in words: aiohttp's own messages carry a
    repr of its connection key, which is no help to an API client."""
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return "no connection within the connect timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "the connection was refused (nothing listens on that port)"
        strerror = getattr(exc.os_error, "strerror", None)
        return f"cannot connect ({strerror})" if strerror else "cannot connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection before answering"
    if isinstance(exc, aiohttp.ClientOSError) and exc.strerror:
        return f"a network error ({exc.strerror})"
    return f"the request failed ({type(exc).__name__})"


def _never_known(_model: str) -> bool:
    return False


def _forwardable(headers: Iterable[tuple[str, str]], drop: frozenset[str]) -> CIMultiDict[str]:
    """Copy ``headers`` less ``drop`` and less any the Connection header names."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for key, value in pairs
        if key.lower() == "connection"
        for token in value.split(",")
    }
    return CIMultiDict((k, v) for k, v in pairs if k.lower() not in drop and k.lower() not in named)


class Proxy:
    """Forward OpenAI-style requests to ``upstream_url``, mapping adapter names.

    ``resolve(model)`` returns the upstream model name for a request's
    ``model`` (for an adapter: its newest live version, in the server's own
    form, see :func:`sglang_model`) or None to pass the request through
    untouched. ``known(model)`` says whether ``model`` is an adapter the serve
    loop knows of; such a model that ``resolve`` cannot map is answered 503
    rather than sent to a server that would reject it.

    ``max_inflight_bytes`` bounds the request body bytes held across all requests
    (see the module docstring); ``client_timeout`` is how long a client may stall.

    ``app`` is a plain :class:`aiohttp.web.Application` (usable with aiohttp's
    test utilities); :meth:`start` and :meth:`stop` run it on a socket. The one
    upstream :class:`aiohttp.ClientSession` lives as long as the application.
    The header timeout is the socket's (:meth:`start`); the others hold under
    aiohttp's test utilities too.
    """

    def __init__(
        self,
        upstream_url: str,
        resolve: Callable[[str], str | None],
        *,
        known: Callable[[str], bool] = _never_known,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        client_timeout: float = DEFAULT_CLIENT_TIMEOUT,
    ) -> None:
        if client_timeout <= 0:
            raise ValueError(f"the client timeout must be above 0 seconds, not {client_timeout}")
        self.upstream = URL(upstream_url.rstrip("/"))
        self._base = str(self.upstream)
        self.resolve = resolve
        self.known = known
        self.inflight = InFlight(max_inflight_bytes)
        self.client_timeout = client_timeout
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        # Bodies are read piece by piece against the in-flight bound, never with
        # request.read(), so aiohttp's own per-request limit does not apply.
        self.app = web.Application()
        self.app.cleanup_ctx.append(self._client_session)
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    async def _client_session(self, _app: web.Application) -> AsyncIterator[None]:
        self._session = aiohttp.ClientSession(
            timeout=UPSTREAM_TIMEOUT,
            # Bodies pass through byte for byte, compressed or not.
            auto_decompress=False,
            # One client's cookies must never reach another client's request.
            cookie_jar=aiohttp.DummyCookieJar(),
            # The server queues requests itself; a pool limit here would only
            # stall streams behind one another.
            connector=aiohttp.TCPConnector(limit=0),
            trust_env=False,
        )
        try:
            yield
        finally:
            await self._session.close()
            self._session = None

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0 picks a free one, see :attr:`port`)."""
        # aiohttp closes a connection that has not completed its request headers within
        # keepalive_timeout of connecting or of its previous response: that is the
        # header timeout, and what ends a half-open connection that never sends.
        self._runner = web.AppRunner(
            self.app, access_log=None, keepalive_timeout=self.client_timeout
        )
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port).start()
        except OSError as exc:
            await self.stop()
            raise ServingError(
                f"The proxy cannot listen on {host}:{port}: {exc.strerror or exc}. "
                "Is another process using that port (--listen)?"
            ) from exc
        log.info(
            "proxy listening on %s, forwarding to %s (in-flight request bodies up to %d bytes, "
            "client timeout %gs)",
            self.url,
            self.upstream,
            self.inflight.limit,
            self.client_timeout,
        )

    async def stop(self) -> None:
        """Stop listening, end open requests and close the upstream session."""
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None

    @property
    def port(self) -> int:
        """The port :meth:`start` bound."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("The proxy is not listening: call start() first.")
        return int(self._runner.addresses[0][1])

    @property
    def url(self) -> str:
        """The proxy's base URL, for clients (``http://host:port``)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("The proxy is not listening: call start() first.")
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def _map_body(self, body: bytearray) -> tuple[bytearray | bytes, str | None, str | None]:
        """Return (body to send, requested model, upstream model) for one request body.

        The upstream model is None when the request passes through unchanged.
        """
        if not _JSON_OBJECT.match(body):
            return body, None, None
        try:
            payload: Any = json.loads(body)
        except ValueError:
            return body, None, None
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str):
            return body, None, None
        target = self.resolve(model)
        if target is None or target == model:
            return body, model, None
        payload["model"] = target
        return json.dumps(payload, ensure_ascii=False).encode(), model, target

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        share = Share(self.inflight)
        try:
            return await self._forward(request, share)
        finally:
            share.release()

    async def _forward(self, request: web.Request, share: Share) -> web.StreamResponse:
        received = await receive(request, share, self.client_timeout)
        if isinstance(received, web.StreamResponse):
            return received
        body, model, target = self._map_body(received)
        del received
        if model is not None and target is None and self.known(model):
            log.debug(
                "%s %s: adapter %r has no live version: 503", request.method, request.path, model
            )
            return openai_error(
                503,
                f"The adapter {model!r} has no version loaded in the inference server yet; "
                "retry once its first version has been announced and loaded.",
                "adapter_not_ready",
                "model",
            )
        if target is not None:
            log.debug("%s %s: model %r -> %r", request.method, request.path, model, target)
        elif model is not None:
            log.debug("%s %s: model %r passes through", request.method, request.path, model)
        else:
            log.debug("%s %s passes through (no model)", request.method, request.path)

        headers = _forwardable(request.headers.items(), _REQUEST_DROP)
        # Only what the client sent goes upstream: aiohttp would otherwise add
        # its own Accept-Encoding (and, with auto_decompress off, hand a client
        # that never asked for it a gzip body), User-Agent and Content-Type.
        skip = {"Accept-Encoding", "User-Agent", "Content-Type"}
        # raw_path keeps the client's percent-encoding and query string as sent.
        url = URL(self._base + request.raw_path, encoded=True)
        assert self._session is not None, "the application's cleanup_ctx opens the session"
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=headers,
                data=SlicedBody(body) if body or request.can_read_body else None,
                skip_auto_headers=skip,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = unreachable_reason(exc)
            log.warning(
                "upstream %s unreachable for %s %s: %s",
                self.upstream,
                request.method,
                request.path,
                reason,
            )
            return openai_error(
                502,
                f"The inference server at {self.upstream} cannot be reached: {reason}. "
                "Check that it is running and that serve's --url is right.",
                "upstream_unreachable",
            )
        finally:
            # The server has the body (it answered, or never will): the bytes are free.
            del body
            share.release()
        async with upstream:
            return await self._relay(request, upstream)

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.update(_forwardable(upstream.headers.items(), HOP_BY_HOP))
        try:
            async with asyncio.timeout(self.client_timeout):
                await response.prepare(request)
            # iter_any yields each piece as soon as it arrives: one SSE event
            # reaches the client while the server is still generating the next.
            async for chunk in upstream.content.iter_any():
                async with asyncio.timeout(self.client_timeout):
                    await response.write(chunk)
            async with asyncio.timeout(self.client_timeout):
                await response.write_eof()
        except ConnectionError:
            # The client went away; closing the upstream connection (rather
            # than draining it) makes vLLM and SGLang abort the generation.
            log.info(
                "client %s went away mid-response to %s %s",
                request.remote,
                request.method,
                request.path,
            )
            upstream.close()
        except TimeoutError:
            log.info(
                "client %s took nothing of the response to %s %s for %gs: closing the connection",
                request.remote,
                request.method,
                request.path,
                self.client_timeout,
            )
            upstream.close()
            # abort, not close: close would wait to flush to a client that reads nothing.
            if request.transport is not None:
                request.transport.abort()
        except aiohttp.ClientError as exc:
            log.warning(
                "upstream %s broke off %s %s mid-response: %r",
                self.upstream,
                request.method,
                request.path,
                exc,
            )
            # The status line is gone already; dropping the connection is the
            # only way left to tell the client that the body is incomplete.
            if request.transport is not None:
                request.transport.close()
        return response
