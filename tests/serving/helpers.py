"""Running serve in-process against a contract server, and waiting for what it does; and
:class:`Upstream`, the small server behind the proxy in the proxy's tests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

from aiohttp import web

from lorastream.dev.topics import produce
from lorastream.serving import Serve, ServeConfig, ServeMetrics
from schemas import AdapterUpdate, Topics, encode
from tests.serving.contract import ContractServer
from trainer.kafka import KafkaConnection

__all__ = [
    "BASE",
    "CHUNKS",
    "CHUNK_DELAY",
    "Upstream",
    "announce",
    "config_for",
    "eventually",
    "running",
]

BASE = "base-model"
CHUNKS = 5
CHUNK_DELAY = 0.3


def config_for(
    bootstrap: str, topics: Topics, prefix: str, server: ContractServer, **more: Any
) -> ServeConfig:
    options: dict[str, Any] = {
        "keep": 2,
        "drain_seconds": 0.5,
        "poll_seconds": 0.2,
        "backoff_start": 0.1,
        "backoff_max": 0.4,
    }
    options.update(more)
    return ServeConfig(
        kafka=KafkaConnection(bootstrap),
        updates_topic=topics.adapter_updates,
        group_id=f"{prefix}lorastream-serve",
        backend=server.kind,
        url=server.url,
        **options,
    )


async def announce(bootstrap: str, topics: Topics, updates: Sequence[AdapterUpdate]) -> None:
    await produce(
        bootstrap,
        topics.adapter_updates,
        [(u.adapter.encode(), encode(u)) for u in updates],
    )


async def eventually(check: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running(config: ServeConfig) -> AsyncIterator[Serve]:
    """Serve as an asyncio task; cancelled (as a kill would end it) on exit."""
    serve = Serve(config, ServeMetrics())
    task = asyncio.create_task(serve.run())
    try:
        await eventually(lambda: serve.ready.is_set() or task.done(), what="serve ready")
        if task.done():
            task.result()
        yield serve
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def committed(bootstrap: str, group: str, topic: str) -> int | None:
    """The group's committed offset of partition 0 of ``topic``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(TopicPartition(topic, 0))
        return offset
    finally:
        await consumer.stop()


class Upstream:
    """An OpenAI-shaped upstream for what the contract servers do not model: it says what it
    received, answers any status, and streams slowly or without end.

    ``GET /v1/models`` lists the base model only (as vLLM with nothing loaded);
    ``/v1/chat/completions`` streams :data:`CHUNKS` events :data:`CHUNK_DELAY` apart, or,
    with ``hold`` seconds, reads the body slowly to its end, holds it that long and answers
    with its size (so that requests overlap); ``/v1/completions`` streams until the client
    goes away; ``/status/{code}`` answers that status; ``/broken`` closes the connection
    mid-stream; any other request is echoed back as JSON.
    """

    def __init__(self, hold: float | None = None) -> None:
        self.hold = hold
        self.received: list[dict[str, Any]] = []
        self.bodies: list[int] = []
        """The size of each chat body read to its end (with ``hold``)."""
        self.sent_at: list[float] = []
        self.client_left = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_route("*", "/status/{code}", self._status)
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_post("/v1/completions", self._endless_stream)
        self.app.router.add_post("/broken", self._broken_stream)
        self.app.router.add_route("*", "/{tail:.*}", self._echo)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.url = ""

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def _record(self, request: web.Request) -> dict[str, Any]:
        body = await request.read()
        seen = {
            "method": request.method,
            "path_qs": request.raw_path,
            "headers": dict(request.headers),
            "body": body.decode("latin-1"),
        }
        self.received.append(seen)
        return seen

    async def _models(self, _request: web.Request) -> web.Response:
        card = {"id": BASE, "object": "model", "root": BASE, "parent": None}
        return web.json_response({"object": "list", "data": [card]})

    async def _echo(self, request: web.Request) -> web.Response:
        return web.json_response(await self._record(request))

    async def _status(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(
            status=int(request.match_info["code"]),
            text="short and stout",
            content_type="text/plain",
            headers={"X-Upstream": "teapot"},
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if self.hold is not None:
            return await self._held(request, self.hold)
        seen = await self._record(request)
        model = json.loads(seen["body"])["model"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(CHUNKS):
            if i:
                await asyncio.sleep(CHUNK_DELAY)
            self.sent_at.append(time.monotonic())
            await response.write(f"data: {json.dumps({'model': model, 'i': i})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _held(self, request: web.Request, hold: float) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        self.bodies.append(size)
        await asyncio.sleep(hold)
        return web.json_response({"model": BASE, "received": size})

    async def _endless_stream(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b'data: {"text": "more"}\n\n')
                await asyncio.sleep(0.05)
        except ConnectionResetError:
            self.client_left.set()
        return response

    async def _broken_stream(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"text": "half"}\n\n')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return response
