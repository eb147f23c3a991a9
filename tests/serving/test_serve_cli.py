"""``lorastream serve`` as a real process: SIGKILLed and started again, with its proxy."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from lorastream.dev.ports import free_port
from lorastream.dev.topics import make_topics
from lorastream.dev.workers import LORASTREAM, Worker, worker_env
from schemas import AdapterUpdate
from tests.serving.contract import contract_server
from tests.serving.helpers import announce, eventually

pytestmark = pytest.mark.timeout(120)


async def test_serve_killed_and_started_again_loads_nothing_twice_and_its_proxy_follows(
    kafka_bootstrap: str,
    prefix: str,
    tmp_path: Path,
    versions: list[AdapterUpdate],
    trained: object,
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    await announce(kafka_bootstrap, topics, versions[:2])
    base = versions[0].base_model
    port = free_port()
    async with contract_server("vllm", base=base) as server:
        args = [
            "serve",
            "--backend",
            "vllm",
            "--url",
            server.url,
            "--keep",
            "2",
            "--drain",
            "0.5",
            "--poll",
            "0.2",
            "--listen",
            f"127.0.0.1:{port}",
        ]
        # Where the announced versions lie: serve loads nothing from outside it.
        adapters = str(Path(versions[0].uri).parents[1])
        env = worker_env(
            kafka_bootstrap, prefix, tmp_path / "home", LORASTREAM_ADAPTER_DIR=adapters
        )
        first = Worker(args, env, tmp_path / "first.log").start()
        try:
            await eventually(lambda: server.loads() == ["tutor-v1", "tutor-v2"], 60, "v1, v2")
            async with aiohttp.ClientSession() as session:
                await eventually(lambda: "proxy listening" in first.output(), 10, "proxy")
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={"model": "tutor", "messages": [{"role": "user", "content": "hi"}]},
                ) as response:
                    assert response.status == 200
                    assert (await response.json())["model"] == "tutor-v2"
        finally:
            first.kill()

        await announce(kafka_bootstrap, topics, versions[2:3])
        with Worker(args, env, tmp_path / "second.log") as second:
            await eventually(lambda: "tutor-v3" in server.loaded, 60, "v3 loaded")
            await eventually(lambda: server.unloads() == ["tutor-v1"], 10, "v1 unloaded")
            assert second.terminate() == 0, second.output()
    assert server.loads() == ["tutor-v1", "tutor-v2", "tutor-v3"], "one load per name"
    said = second.output()
    assert "loaded tutor-v3 from " + versions[2].uri in said
    assert "live: tutor -> tutor-v3" in said
    assert "Traceback" not in first.output() + said


async def test_serve_refuses_a_rank_vllm_does_not_accept(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        [LORASTREAM, "serve", "--backend", "vllm", "--url", "http://x", "--max-lora-rank", "12"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "12 is not one of 1, 8, 16" in done.stderr
