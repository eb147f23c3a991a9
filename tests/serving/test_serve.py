"""The serve loop against the vLLM and SGLang contract servers, on the real broker.

Every test runs once per server kind. serve runs in-process (an asyncio task), with a
short drain, poll and backoff so that each test takes seconds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lorastream.dev.topics import make_topics
from lorastream.serving import Serve
from schemas import AdapterUpdate
from tests.serving.contract import ContractServer
from tests.serving.helpers import announce, committed, config_for, eventually, running

pytestmark = pytest.mark.timeout(90)


def _names(*versions: int) -> list[str]:
    return [f"tutor-v{v}" for v in versions]


def _metric(serve: Serve, name: str, **labels: str) -> float:
    value = serve.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_versions_load_in_order_under_new_names_and_the_oldest_unloads_after_the_drain(
    kafka_bootstrap: str, prefix: str, server: ContractServer, versions: list[AdapterUpdate]
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    await announce(kafka_bootstrap, topics, versions[:2])
    config = config_for(kafka_bootstrap, topics, prefix, server, keep=2, drain_seconds=0.5)
    async with running(config) as serve:
        await eventually(lambda: server.loads() == _names(1, 2), what="v1 and v2 loaded")
        assert serve.live("tutor") == "tutor-v2"
        assert server.loaded == {f"tutor-v{u.version}": u.uri for u in versions[:2]}

        await announce(kafka_bootstrap, topics, versions[2:3])
        await eventually(lambda: serve.live("tutor") == "tutor-v3", what="v3 live")
        await eventually(lambda: server.unloads() == _names(1), what="v1 unloaded")

    assert server.loads() == _names(1, 2, 3), "each version once, oldest first"
    assert set(server.loaded) == set(_names(2, 3))
    times = {(action, name): t for t, action, name in server.events}
    drained = times[("unload", "tutor-v1")] - times[("load", "tutor-v3")]
    assert drained >= 0.45, f"v1 unloaded {drained:.2f}s after v3 loaded, before the drain"
    assert _metric(serve, "lorastream_serve_loads_total", adapter="tutor") == 3
    assert _metric(serve, "lorastream_serve_unloads_total", adapter="tutor") == 1
    assert _metric(serve, "lorastream_serve_live_version", adapter="tutor") == 3
    expected = "tutor-v3" if server.kind == "vllm" else f"{server.base}:tutor-v3"
    assert serve.resolve("tutor") == expected and serve.resolve("other") is None


async def test_a_corrupt_file_and_a_wrong_base_model_are_refused_and_the_previous_version_stays(
    kafka_bootstrap: str,
    prefix: str,
    server: ContractServer,
    versions: list[AdapterUpdate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    await announce(kafka_bootstrap, topics, versions[:1])
    config = config_for(kafka_bootstrap, topics, prefix, server, keep=1, drain_seconds=0.2)
    async with running(config) as serve:
        await eventually(lambda: serve.live("tutor") == "tutor-v1", what="v1 live")

        weights = Path(versions[1].uri) / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))  # changed after its announcement
        await announce(kafka_bootstrap, topics, versions[1:2])
        await eventually(
            lambda: (
                _metric(serve, "lorastream_serve_refusals_total", adapter="tutor", reason="sha256")
                == 1
            ),
            what="v2 refused",
        )
        elsewhere = versions[2].model_copy(update={"base_model": "/models/another-base"})
        await announce(kafka_bootstrap, topics, [elsewhere])
        await eventually(
            lambda: (
                _metric(
                    serve, "lorastream_serve_refusals_total", adapter="tutor", reason="base_model"
                )
                == 1
            ),
            what="v3 refused",
        )
        await asyncio.sleep(0.5)  # more than the drain: v1 must not go
        assert serve.live("tutor") == "tutor-v1" and set(server.loaded) == {"tutor-v1"}

        await announce(kafka_bootstrap, topics, versions[3:4])
        await eventually(lambda: serve.live("tutor") == "tutor-v4", what="v4 live")
        await eventually(lambda: server.unloads() == _names(1), what="v1 unloaded")

    assert server.loads() == _names(1, 4)
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert any("tutor-v2 (sha256)" in m and str(weights) in m for m in refusals), refusals
    assert any("tutor-v3 (base_model)" in m and "/models/another-base" in m for m in refusals)
    assert all("tutor-v1 stays live" in m for m in refusals)


async def test_a_server_that_is_down_for_a_while_gets_the_newest_versions_when_it_is_back(
    kafka_bootstrap: str, prefix: str, server: ContractServer, versions: list[AdapterUpdate]
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    await announce(kafka_bootstrap, topics, versions[:1])
    config = config_for(kafka_bootstrap, topics, prefix, server, keep=2)
    async with running(config) as serve:
        await eventually(lambda: serve.live("tutor") == "tutor-v1", what="v1 live")
        await server.down()
        await announce(kafka_bootstrap, topics, versions[1:3])
        await eventually(lambda: "tutor" in serve.versions and 3 in serve.versions["tutor"].updates)
        await asyncio.sleep(1.0)  # several failed tries
        assert _metric(serve, "lorastream_serve_server_up") == 0
        await server.up()
        await eventually(lambda: serve.live("tutor") == "tutor-v3", what="v3 live")
        await eventually(lambda: server.unloads() == _names(1), what="v1 unloaded")
    assert server.loads() == _names(1, 2, 3)
    assert set(server.loaded) == set(_names(2, 3))


async def test_a_server_restart_that_forgets_every_adapter_is_filled_again(
    kafka_bootstrap: str, prefix: str, server: ContractServer, versions: list[AdapterUpdate]
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    await announce(kafka_bootstrap, topics, versions[:3])
    config = config_for(kafka_bootstrap, topics, prefix, server, keep=2)
    async with running(config) as serve:
        await eventually(lambda: set(server.loaded) == set(_names(2, 3)), what="v2, v3")
        await server.restart()
        assert server.loaded == {}
        await eventually(lambda: set(server.loaded) == set(_names(2, 3)), what="v2, v3 again")
        assert serve.live("tutor") == "tutor-v3"
    assert server.loads() == _names(2, 3, 2, 3), "in version order, after the restart too"


async def test_a_killed_serve_that_starts_again_loads_nothing_twice(
    kafka_bootstrap: str, prefix: str, server: ContractServer, versions: list[AdapterUpdate]
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    await announce(kafka_bootstrap, topics, versions[:2])
    config = config_for(kafka_bootstrap, topics, prefix, server, keep=2)
    async with running(config) as serve:
        await eventually(lambda: serve.live("tutor") == "tutor-v2", what="v2 live")
        for _ in range(40):  # the group's offset follows what was handled
            if await committed(kafka_bootstrap, config.group_id, config.updates_topic) == 2:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the serve group never committed offset 2")
    # Cancelled as a kill would end it; then a new serve, and a new version.
    await announce(kafka_bootstrap, topics, versions[2:3])
    async with running(config) as again:
        await eventually(lambda: again.live("tutor") == "tutor-v3", what="v3 live")
        await eventually(lambda: server.unloads() == _names(1), what="v1 unloaded")
    assert server.loads() == _names(1, 2, 3), "one load per name"


async def test_request_stop_ends_the_loop_at_once(
    kafka_bootstrap: str, prefix: str, vllm_server: ContractServer
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    serve = Serve(config_for(kafka_bootstrap, topics, prefix, vllm_server))
    task = asyncio.create_task(serve.run())
    await eventually(serve.ready.is_set, what="ready")
    serve.request_stop()
    await asyncio.wait_for(task, 10)
    assert serve.live("tutor") is None and vllm_server.loads() == []
