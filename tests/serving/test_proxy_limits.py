"""The proxy's limits, on a real ``lorastream serve --listen`` process with its real logging.

What a client can make the serve process hold is bounded: request bodies in flight (its
peak RSS is read from ``/proc``), clients that stall (closed after the timeout), clients
that go away (one log line each, never a traceback). The upstream is the small
vLLM-shaped ``tests.serving.helpers.Upstream``, holding each body a while, so that
requests overlap. Loopback only.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from lorastream.dev.ports import free_port
from lorastream.dev.topics import make_topics
from lorastream.dev.workers import Worker, worker_env
from tests.serving.helpers import BASE, Upstream, eventually

pytestmark = pytest.mark.timeout(90)

MiB = 1024 * 1024


@asynccontextmanager
async def serving(
    bootstrap: str, prefix: str, tmp_path: Path, **env: str
) -> AsyncIterator[tuple[Worker, str, Upstream]]:
    """``lorastream serve --listen`` in its own process, with ``env`` added to its
    environment; yields the process, the proxy's URL and the upstream."""
    await make_topics(bootstrap, prefix)
    upstream = Upstream(hold=0.3)
    await upstream.start()
    port = free_port()
    args = ["serve", "--backend", "vllm", "--url", upstream.url, "--listen", f"127.0.0.1:{port}"]
    worker = Worker(args, worker_env(bootstrap, prefix, tmp_path / "home", **env), tmp_path / "log")
    try:
        with worker:
            # Once the lineage is read, serve itself is quiet until something is announced.
            await eventually(
                lambda: "lineage read" in worker.output() or not worker.alive(),
                60,
                "serve ready",
            )
            assert worker.alive(), worker.output()
            assert "proxy listening" in worker.output()
            yield worker, f"http://127.0.0.1:{port}", upstream
    finally:
        await upstream.stop()


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of process ``pid``, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _chat_body(size: int) -> bytes:
    head = json.dumps({"model": BASE, "messages": [{"role": "user", "content": ""}]})
    before, after = head.rsplit('""', 1)
    filler = size - len(before) - len(after) - 2
    return f'{before}"{"x" * filler}"{after}'.encode()


async def _pieces(body: bytes, size: int = MiB) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]
        await asyncio.sleep(0)


async def _post(
    client: aiohttp.ClientSession, url: str, body: bytes, chunked: bool
) -> tuple[int, str]:
    data = _pieces(body) if chunked else body
    headers = {"Content-Type": "application/json"}
    async with client.post(f"{url}/v1/chat/completions", data=data, headers=headers) as resp:
        return resp.status, await resp.text()


def _lines_since(worker: Worker, start: int) -> list[str]:
    return [line for line in worker.output()[start:].splitlines() if line.strip()]


async def test_concurrent_large_bodies_stay_within_the_in_flight_bound(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    """Eight 20 MiB bodies at once (four with Content-Length, four chunked) against a
    48 MiB bound: at most two are held, the others get a 503 that names the bound. A body
    larger than the bound is a 413, with or without Content-Length. The serve process's
    peak RSS grows by the bodies held plus the one being parsed, never by all eight (the
    unbounded proxy grew by about 230 MiB here; bounded, by about 85)."""
    bound, size = 48 * MiB, 20 * MiB
    env = {"LORASTREAM_PROXY_MAX_INFLIGHT_BYTES": str(bound)}
    async with serving(kafka_bootstrap, prefix, tmp_path, **env) as (worker, url, upstream):
        assert worker.proc is not None
        before = _status(worker.proc.pid)["VmRSS"]
        body = _chat_body(size)
        async with aiohttp.ClientSession() as client:
            answers = await asyncio.gather(
                *(_post(client, url, body, chunked=n % 2 == 1) for n in range(8))
            )
            statuses = sorted(status for status, _ in answers)
            assert set(statuses) <= {200, 503}, answers
            assert 1 <= statuses.count(200) < 8, statuses
            busy = json.loads(next(text for status, text in answers if status == 503))
            assert busy["error"]["type"] == "proxy_busy"
            assert f"in-flight request bytes ({bound} bytes" in busy["error"]["message"]

            too_large = _chat_body(bound + MiB)
            for chunked in (False, True):
                status, text = await _post(client, url, too_large, chunked)
                assert status == 413, text
                assert f"({bound} bytes" in json.loads(text)["error"]["message"]
            peak = _status(worker.proc.pid)["VmHWM"]

            # Every reservation was given back: a body of the bound's size fits again.
            assert (await _post(client, url, _chat_body(bound), chunked=False))[0] == 200
        assert sorted(upstream.bodies) == [size] * statuses.count(200) + [bound]
    growth = peak - before
    print(f"\nserve's RSS: {before / MiB:.0f} MiB before, peak {peak / MiB:.0f} MiB after")
    # Held bodies, at most the bound; the one body being parsed (json.loads makes its text
    # and the strings in it, about three times its size, one body at a time); slack.
    assert growth < bound + 3 * size + 16 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB"
    assert "Traceback" not in worker.output()


async def test_a_client_that_goes_away_is_one_log_line_and_the_next_is_served(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    async with serving(kafka_bootstrap, prefix, tmp_path) as (worker, url, upstream):
        host, port = url.removeprefix("http://").split(":")
        # Half a body, then gone.
        start = len(worker.output())
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
            b"Content-Type: application/json\r\nContent-Length: 200000\r\n\r\n"
            + b'{"model": "base-model", "x": "'
            + b"x" * 100_000
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        await eventually(lambda: "went away" in worker.output()[start:], 10, "one line")
        await asyncio.sleep(0.5)  # for anything else it would write
        lines = _lines_since(worker, start)
        assert len(lines) == 1, lines
        assert "went away mid-upload of POST /v1/chat/completions" in lines[0]

        async with aiohttp.ClientSession() as client:
            status, text = await _post(client, url, _chat_body(1000), chunked=False)
            assert status == 200, text

            # Gone in the middle of a streamed response.
            start = len(worker.output())
            resp = await client.post(f"{url}/v1/completions", json={"stream": True})
            assert await resp.content.readline() == b'data: {"text": "more"}\n'
            resp.close()
            await asyncio.wait_for(upstream.client_left.wait(), 5)
            await eventually(lambda: "went away" in worker.output()[start:], 10, "one line")
            await asyncio.sleep(0.5)
            lines = _lines_since(worker, start)
            assert len(lines) == 1, lines
            assert "went away mid-response to POST /v1/completions" in lines[0]

            status, text = await _post(client, url, _chat_body(1000), chunked=True)
            assert status == 200, text
    assert "Traceback" not in worker.output()


@pytest.mark.timed  # asserts on wall time or memory
async def test_a_stalled_client_is_disconnected_after_the_timeout(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    """Three clients that stall: one sends nothing, one half its headers, one half its
    body. Each connection is closed about a timeout (1 s here) after it stalled; the one
    with headers gets a 408 first."""
    timeout = 1.0
    env = {"LORASTREAM_PROXY_CLIENT_TIMEOUT": str(timeout)}
    sends = {
        "nothing": b"",
        "half the headers": b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n",
        "half the body": b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
        b"Content-Length: 100\r\n\r\n" + b"x" * 50,
    }

    async def stall(sent: bytes) -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection(host, int(port))
        started = time.monotonic()
        writer.write(sent)
        await writer.drain()
        try:
            # read() returns once the proxy has closed the connection.
            answer = await asyncio.wait_for(reader.read(), timeout + 5)
        finally:
            writer.close()
        return time.monotonic() - started, answer

    async with serving(kafka_bootstrap, prefix, tmp_path, **env) as (worker, url, _upstream):
        host, port = url.removeprefix("http://").split(":")
        outcomes = dict(zip(sends, await asyncio.gather(*map(stall, sends.values())), strict=True))
        for what, (took, answer) in outcomes.items():
            assert 0.8 * timeout < took < timeout + 2.5, f"{what}: closed after {took:.2f}s"
            if what == "half the body":
                assert answer.startswith(b"HTTP/1.1 408 "), answer
                assert b"nothing arrived for 1s" in answer
            else:
                assert answer == b"", f"{what}: {answer!r}"
        async with aiohttp.ClientSession() as client:
            status, text = await _post(client, url, _chat_body(1000), chunked=False)
            assert status == 200, text
    said = worker.output()
    assert said.count("sent nothing of POST /v1/chat/completions's body for 1s") == 1, said
    assert "Traceback" not in said
