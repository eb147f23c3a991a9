"""Serving many tenants (issue 22, build item 4, and finding 13's server that is down):
a load counts once the server lists it, a server that is full gets room made, and the
stable name never points at a version the server does not hold.

serve runs in-process against the contract servers (both kinds), on the real broker. A
watcher samples ``serve.resolve`` every few milliseconds and checks, each time, that the
server holds what it names: the proxy's resolve is that call.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from lorastream.dev.topics import make_topics
from lorastream.serving import Serve
from lorastream.serving.capacity import Capacity
from lorastream.serving.proxy import Proxy
from schemas import AdapterUpdate
from tests.serving.contract import ContractServer
from tests.serving.helpers import announce, config_for, eventually, running

pytestmark = pytest.mark.timeout(120)


def _metric(serve: Serve, name: str, **labels: str) -> float:
    return serve.metrics.registry.get_sample_value(name, labels) or 0.0


def _held(server: ContractServer, target: str) -> bool:
    return target.rsplit(":", 1)[-1] in server.loaded


@contextlib.asynccontextmanager
async def watching(
    serve: Serve, server: ContractServer, adapters: list[str]
) -> AsyncIterator[list[str]]:
    """Every ``resolve`` of ``adapters``, sampled until the block ends, must name a
    version the server holds; yields the list of what was seen (for the asserts)."""
    seen: list[str] = []
    wrong: list[str] = []

    async def watch() -> None:
        while True:
            for adapter in adapters:
                target = serve.resolve(adapter)
                if target is not None:
                    seen.append(target)
                    if not _held(server, target):
                        wrong.append(
                            f"{adapter} -> {target} while the server holds {sorted(server.loaded)}"
                        )
            await asyncio.sleep(0.003)

    task = asyncio.create_task(watch())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert not wrong, wrong[:3]


async def test_a_load_the_server_answers_but_does_not_list_is_failed_and_tried_again(
    kafka_bootstrap: str, prefix: str, server: ContractServer, versions: list[AdapterUpdate]
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    server.lie_loads = 2  # vllm#18372: 200 for a load that did nothing
    await announce(kafka_bootstrap, topics, versions[:1])
    config = config_for(kafka_bootstrap, topics, prefix, server)
    async with running(config) as serve, watching(serve, server, ["tutor"]) as seen:
        await eventually(lambda: serve.live("tutor") == "tutor-v1", what="v1 live at last")
        # The watcher samples every few ms: on a busy machine it may not have turned yet.
        await eventually(lambda: bool(seen), 10, "the watcher saw v1 live")
    assert [(a, n) for _, a, n in server.events if a in ("lie", "load")] == [
        ("lie", "tutor-v1"),
        ("lie", "tutor-v1"),
        ("load", "tutor-v1"),
    ]
    assert seen, "the watcher saw v1 live"
    assert _metric(serve, "lorastream_serve_unconfirmed_loads_total", adapter="tutor") == 2
    assert _metric(serve, "lorastream_serve_refusals_total", adapter="tutor", reason="server") == 0


def _tenants(versions: list[AdapterUpdate], names: list[str], root: Path) -> list[AdapterUpdate]:
    """The trained versions again under each of ``names``, round robin: a1, b1, …, a2, …"""
    out = []
    for update in versions:
        for name in names:
            target = root / name / f"v{update.version}"
            shutil.copytree(update.uri, target)
            out.append(update.model_copy(update={"adapter": name, "uri": str(target)}))
    return out


async def test_many_adapters_on_a_server_with_little_room_each_get_their_newest_version(
    kafka_bootstrap: str,
    prefix: str,
    server: ContractServer,
    versions: list[AdapterUpdate],
    tmp_path: Path,
) -> None:
    names = ["ada", "bo", "cy", "di"]
    server.capacity = len(names)  # as SGLang's --max-loaded-loras refused (sglang#8650)
    updates = _tenants(versions[:3], names, tmp_path / "tenants")
    topics = await make_topics(kafka_bootstrap, prefix)
    config = config_for(kafka_bootstrap, topics, prefix, server, keep=2, drain_seconds=0.3)
    async with running(config) as serve, watching(serve, server, names) as seen:
        proxy = Proxy(server.url, serve.resolve, known=serve.known)
        await proxy.start("127.0.0.1", 0)
        try:
            for update in updates:  # one at a time: each is the newest once
                await announce(kafka_bootstrap, topics, [update])
                await asyncio.sleep(0.05)
            newest = {name: f"{name}-v3" for name in names}
            await eventually(
                lambda: all(serve.live(n) == v for n, v in newest.items()), 30, "every v3 live"
            )
            await eventually(lambda: bool(seen), 10, "the watcher saw versions live")
            async with aiohttp.ClientSession() as client:
                for name in names:
                    body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
                    async with client.post(f"{proxy.url}/v1/chat/completions", json=body) as r:
                        assert r.status == 200
                        assert (await r.json())["model"].endswith(f"{name}-v3")
        finally:
            await proxy.stop()
    assert set(server.loaded) == set(newest.values())
    assert "full" in {action for _, action, _ in server.events}, "the server was full"
    assert serve.reconciler.capacity.limit == len(names)
    assert server.unloads(), "older versions made room"
    assert seen, "the watcher saw versions live"
    for name in names:
        assert _metric(serve, "lorastream_serve_refusals_total", adapter=name, reason="server") == 0


def test_the_room_goes_to_every_adapters_newest_version_first() -> None:
    kept = {"a": [1, 2], "b": [4, 5], "c": [7]}
    assert Capacity().wanted(kept, []) == {"a-v1", "a-v2", "b-v4", "b-v5", "c-v7"}
    room = Capacity(limit=4)
    assert room.wanted(kept, []) == {"a-v2", "b-v5", "c-v7", "a-v1"}
    # Adapters with nothing loaded wait behind those that have a version in.
    tight = Capacity(limit=2)
    assert tight.wanted(kept, [("c", 6), ("b", 4)]) == {"b-v5", "c-v7"}


async def test_a_server_that_stays_down_is_said_again_while_serve_retries(
    kafka_bootstrap: str,
    prefix: str,
    vllm_server: ContractServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    await vllm_server.down()
    config = config_for(
        kafka_bootstrap, topics, prefix, vllm_server, unreachable_log_every=0.3, backoff_max=0.1
    )
    serve = Serve(config)
    task = asyncio.create_task(serve.run())
    try:
        await eventually(
            lambda: sum("still unreachable" in r.getMessage() for r in caplog.records) >= 2,
            10,
            "said again",
        )
        await vllm_server.up()
        await eventually(serve.ready.is_set, 10, "ready once the server is up")
    finally:
        serve.request_stop()
        await asyncio.wait_for(task, 10)
    said = [r.getMessage() for r in caplog.records if "still unreachable" in r.getMessage()]
    assert vllm_server.url in said[0] and "still retrying" in said[0], said[0]
