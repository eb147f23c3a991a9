"""The proxy: one stable name per adapter, everything else passed through, streams unbuffered.

Upstreams are the contract servers (``tests/serving/contract.py``), which answer with the
model they actually used, and, for what they do not model (echoing headers and queries,
odd status codes, slow streams), the small echo server ``tests.serving.helpers.Upstream``.
No Kafka.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from lorastream.serving.exceptions import ServingError
from lorastream.serving.proxy import Proxy, sglang_model
from tests.serving.contract import contract_server
from tests.serving.helpers import CHUNK_DELAY, CHUNKS, Upstream

pytestmark = pytest.mark.timeout(30)


@asynccontextmanager
async def running_proxy(
    upstream: str,
    resolve: Callable[[str], str | None],
    known: Callable[[str], bool] = lambda _model: False,
) -> AsyncIterator[Proxy]:
    proxy = Proxy(upstream, resolve, known=known)
    await proxy.start("127.0.0.1", 0)
    try:
        yield proxy
    finally:
        await proxy.stop()


@pytest.fixture
async def echo() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "7 times 8?"}], **extra}


async def test_adapter_name_reaches_vllm_as_its_newest_live_version() -> None:
    live = {"math-tutor": "math-tutor-v1"}
    async with contract_server("vllm") as server, running_proxy(server.url, live.get) as proxy:
        server.loaded.update({"math-tutor-v1": "/a/v1", "math-tutor-v2": "/a/v2"})
        async with aiohttp.ClientSession(proxy.url) as client:
            async with client.post("/v1/chat/completions", json=chat("math-tutor")) as resp:
                assert resp.status == 200
                assert (await resp.json())["model"] == "math-tutor-v1"

            live["math-tutor"] = "math-tutor-v2"
            async with client.post("/v1/completions", json={"model": "math-tutor"}) as resp:
                assert (await resp.json())["model"] == "math-tutor-v2"
            async with client.post(
                "/v1/chat/completions", json=chat("math-tutor", stream=True)
            ) as resp:
                assert resp.content_type == "text/event-stream"
                text = await resp.text()
        assert server.requests == ["math-tutor-v1", "math-tutor-v2", "math-tutor-v2"]
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert {json.loads(e)["model"] for e in events[:-1]} == {"math-tutor-v2"}


async def test_adapter_name_reaches_sglang_as_base_colon_version() -> None:
    live = {"math-tutor": "math-tutor-v3"}

    def resolve(model: str) -> str | None:
        name = live.get(model)
        return None if name is None else sglang_model("base-model", name)

    # Through aiohttp's own test utilities, which run Proxy.app without start().
    async with contract_server("sglang") as server:
        server.loaded["math-tutor-v3"] = "/a/v3"
        async with TestClient(TestServer(Proxy(server.url, resolve).app)) as client:
            resp = await client.post("/v1/chat/completions", json=chat("math-tutor"))
            assert resp.status == 200
            assert (await resp.json())["model"] == "base-model:math-tutor-v3"
        assert server.requests == ["base-model:math-tutor-v3"]


async def test_base_model_and_other_models_pass_through_unchanged() -> None:
    live = {"math-tutor": "math-tutor-v1"}
    async with contract_server("vllm") as server, running_proxy(server.url, live.get) as proxy:
        server.loaded["support-v4"] = "/s/v4"
        async with aiohttp.ClientSession(proxy.url) as client:
            for model in ("base-model", "support-v4"):
                async with client.post("/v1/chat/completions", json=chat(model)) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["model"] == model
            # The server's own error reaches the client as it gave it.
            async with client.post("/v1/chat/completions", json=chat("nobody")) as resp:
                assert resp.status == 404
                assert resp.content_type == "application/json"
                assert (await resp.json())["error"]["type"] == "NotFoundError"
        assert server.requests == ["base-model", "support-v4", "nobody"]


async def test_get_models_and_health_pass_through() -> None:
    async with (
        contract_server("vllm") as server,
        running_proxy(server.url, lambda _m: "never-used") as proxy,
    ):
        server.loaded["math-tutor-v1"] = "/a/v1"
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{server.url}/v1/models") as direct:
                expected = await direct.json()
            async with client.get(f"{proxy.url}/v1/models") as resp:
                assert resp.status == 200
                assert await resp.json() == expected
            async with client.get(f"{proxy.url}/health") as resp:
                assert resp.status == 200


async def test_known_adapter_without_live_version_is_503_in_openai_shape() -> None:
    live: dict[str, str] = {}
    async with (
        contract_server("vllm") as server,
        running_proxy(server.url, live.get, known=lambda m: m == "math-tutor") as proxy,
        aiohttp.ClientSession(proxy.url) as client,
        client.post("/v1/chat/completions", json=chat("math-tutor")) as resp,
    ):
        assert resp.status == 503
        error = (await resp.json())["error"]
        assert error["type"] == "adapter_not_ready"
        assert "math-tutor" in error["message"]
        assert server.requests == []


async def test_unreachable_upstream_is_502_in_openai_shape() -> None:
    async with contract_server("vllm") as server:
        url = server.url
    started = time.monotonic()
    async with (
        running_proxy(url, lambda _m: None) as proxy,
        aiohttp.ClientSession(proxy.url) as client,
        client.post("/v1/chat/completions", json=chat("base-model")) as resp,
    ):
        assert resp.status == 502
        error = (await resp.json())["error"]
        assert error["type"] == "upstream_unreachable"
        assert url in error["message"]
        # The reason in words, not aiohttp's repr of its connection key (issue 22, #14).
        assert "refused" in error["message"], error["message"]
        for repr_bit in ("ConnectionKey(", "proxy_headers_hash", "ssl=", "Error("):
            assert repr_bit not in error["message"], error["message"]
    assert time.monotonic() - started < 5


async def test_method_path_query_headers_and_body_pass_through(echo: Upstream) -> None:
    live = {"math-tutor": "math-tutor-v2"}
    raw = b"\x00not json \xff"
    async with running_proxy(echo.url, live.get) as proxy, aiohttp.ClientSession() as client:
        headers = {"Authorization": "Bearer sk-test", "X-Trace": "abc", "Proxy-Authorization": "x"}
        url = f"{proxy.url}/v1/files/f%2F1?purpose=fine%20tune&purpose=b"
        async with client.put(url, data=raw, headers=headers) as resp:
            seen = await resp.json()
        assert seen["method"] == "PUT"
        assert seen["path_qs"] == "/v1/files/f%2F1?purpose=fine%20tune&purpose=b"
        assert seen["headers"]["Authorization"] == "Bearer sk-test"
        assert seen["headers"]["X-Trace"] == "abc"
        assert "Proxy-Authorization" not in seen["headers"]
        assert seen["body"].encode("latin-1") == raw

        body = chat("math-tutor", temperature=0.25, user="ünï")
        async with client.post(
            f"{proxy.url}/v1/chat/completions/echo?x=1", json=body, headers=headers
        ) as resp:
            seen = await resp.json()
        assert seen["path_qs"] == "/v1/chat/completions/echo?x=1"
        assert seen["headers"]["Authorization"] == "Bearer sk-test"
        assert seen["headers"]["Content-Type"] == "application/json"
        assert json.loads(seen["body"].encode("latin-1")) == {**body, "model": "math-tutor-v2"}


async def test_status_code_content_type_and_headers_come_back(echo: Upstream) -> None:
    async with (
        running_proxy(echo.url, lambda _m: None) as proxy,
        aiohttp.ClientSession(proxy.url) as client,
        client.post("/status/418", json=chat("base-model")) as resp,
    ):
        assert resp.status == 418
        assert resp.content_type == "text/plain"
        assert resp.headers["X-Upstream"] == "teapot"
        assert await resp.text() == "short and stout"


async def test_stream_reaches_the_client_chunk_by_chunk(echo: Upstream) -> None:
    live = {"math-tutor": "math-tutor-v7"}
    arrivals: list[tuple[float, bytes]] = []
    async with running_proxy(echo.url, live.get) as proxy, aiohttp.ClientSession() as client:
        started = time.monotonic()
        async with client.post(
            f"{proxy.url}/v1/chat/completions", json=chat("math-tutor", stream=True)
        ) as resp:
            assert resp.content_type == "text/event-stream"
            async for chunk in resp.content.iter_any():
                arrivals.append((time.monotonic(), chunk))
    assert len(echo.sent_at) == CHUNKS
    # The first event arrives long before the upstream has sent the last one…
    assert arrivals[0][0] - started < CHUNK_DELAY
    assert arrivals[0][0] < echo.sent_at[-1] - 0.5
    # …and the stream as a whole lasts as long as the upstream took to write it.
    assert arrivals[-1][0] - started > (CHUNKS - 1) * CHUNK_DELAY * 0.9
    # Every event came before the next one was written upstream.
    for i in range(1, CHUNKS):
        before = b"".join(chunk for at, chunk in arrivals if at < echo.sent_at[i])
        assert before.count(b"data: ") == i
    events = [line[6:] for line in b"".join(c for _, c in arrivals).decode().splitlines() if line]
    assert events[-1] == "[DONE]"
    assert [json.loads(e) for e in events[:-1]] == [
        {"model": "math-tutor-v7", "i": i} for i in range(CHUNKS)
    ]


async def test_client_leaving_mid_stream_ends_the_upstream_request(echo: Upstream) -> None:
    # vLLM and SGLang abort a generation when its connection closes; a proxy that kept
    # reading would keep the GPU busy for a client that is gone.
    async with running_proxy(echo.url, lambda _m: None) as proxy, aiohttp.ClientSession() as client:
        resp = await client.post(f"{proxy.url}/v1/completions", json={"stream": True})
        assert await resp.content.readline() == b'data: {"text": "more"}\n'
        resp.close()
        await asyncio.wait_for(echo.client_left.wait(), timeout=2)


async def test_upstream_breaking_mid_stream_is_not_a_clean_end(echo: Upstream) -> None:
    async with (
        running_proxy(echo.url, lambda _m: None) as proxy,
        aiohttp.ClientSession(proxy.url) as client,
        client.post("/broken", json={"stream": True}) as resp,
    ):
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_a_port_in_use_is_a_serving_error_naming_it(echo: Upstream) -> None:
    port = int(echo.url.rsplit(":", 1)[1])
    proxy = Proxy(echo.url, lambda _m: None)
    with pytest.raises(ServingError, match=rf"127\.0\.0\.1:{port}"):
        await proxy.start("127.0.0.1", port)
