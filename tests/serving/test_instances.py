"""One serve per inference server (issue 22, findings 1 and 13): each serve follows every
announcement in a group of its own, a second serve for the same server is refused at
start, and a --url that is no URL is one line rather than a retry loop.

The serves here are real ``lorastream serve`` processes on the real broker, in front of
contract servers, except the cross-machine clash, which runs two in-process serves that
share no lock file (as on two machines) so that only the group's members can tell.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import aiohttp
import pytest

from lorastream.dev.ports import free_port
from lorastream.dev.topics import make_topics
from lorastream.dev.workers import LORASTREAM, Worker, worker_env
from lorastream.serving import Serve
from lorastream.serving.exceptions import ServeClash, ServeUrlError
from lorastream.serving.instance import CLIENT_PREFIX, group_key, normalise_url, serve_group
from schemas import AdapterUpdate
from tests.serving.contract import ContractServer, contract_server
from tests.serving.helpers import announce, config_for, eventually, running
from trainer.claims import group_members
from trainer.kafka import KafkaConnection

pytestmark = pytest.mark.timeout(180)


def _serve_args(server: ContractServer, port: int) -> list[str]:
    return [
        "serve",
        "--backend",
        server.kind,
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


def _env(bootstrap: str, prefix: str, home: Path, versions: list[AdapterUpdate]) -> dict[str, str]:
    # Where the announced versions lie: serve loads nothing from outside it.
    adapters = str(Path(versions[0].uri).parents[1])
    return worker_env(bootstrap, prefix, home, LORASTREAM_ADAPTER_DIR=adapters)


async def _ask(port: int, model: str = "tutor") -> tuple[int, str]:
    """One chat request through a serve's proxy: its status and the model that answered."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response,
    ):
        answer = await response.json()
        return response.status, str(answer.get("model", ""))


def _served(server: ContractServer, name: str) -> str:
    return name if server.kind == "vllm" else f"{server.base}:{name}"


async def test_two_serves_for_two_servers_each_load_every_version_and_answer_the_newest(
    kafka_bootstrap: str,
    prefix: str,
    tmp_path: Path,
    versions: list[AdapterUpdate],
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    await announce(kafka_bootstrap, topics, versions[:1])
    base = versions[0].base_model
    env = _env(kafka_bootstrap, prefix, tmp_path / "home", versions)
    ports = [free_port(), free_port()]
    async with (
        contract_server("vllm", base=base) as one,
        contract_server("sglang", base=base) as two,
    ):
        servers = [one, two]
        workers = [
            Worker(_serve_args(server, port), env, tmp_path / f"serve-{server.kind}.log").start()
            for server, port in zip(servers, ports, strict=True)
        ]
        try:
            for server in servers:
                await eventually(lambda s=server: "tutor-v1" in s.loaded, 60, "v1 loaded")
            # Each in a group of its own, named after its server's URL.
            kafka = KafkaConnection(kafka_bootstrap)
            for server in servers:
                group = serve_group(prefix, server.url)
                members = await group_members(kafka, group)
                assert [m.client_id[: len(CLIENT_PREFIX)] for m in members] == [CLIENT_PREFIX]
            # One announcement at a time, so that each version is the newest once: every
            # serve must see every one (two serves in one group shared them out).
            for update in versions[1:]:
                await announce(kafka_bootstrap, topics, [update])
                name = f"tutor-v{update.version}"
                for server in servers:
                    await eventually(lambda s=server, n=name: n in s.loaded, 30, f"{name} loaded")
            for server, port, worker in zip(servers, ports, workers, strict=True):
                await eventually(lambda w=worker: "proxy listening" in w.output(), 10, "proxy")
                assert await _ask(port) == (200, _served(server, "tutor-v4"))
        finally:
            codes = [worker.terminate() for worker in workers]
    for server in servers:
        assert server.loads() == ["tutor-v1", "tutor-v2", "tutor-v3", "tutor-v4"], server.kind
    assert codes == [0, 0], [w.output() for w in workers]
    assert all("Traceback" not in w.output() for w in workers)


async def test_a_second_serve_for_the_same_server_is_refused_in_one_line_and_the_first_serves_on(
    kafka_bootstrap: str,
    prefix: str,
    tmp_path: Path,
    versions: list[AdapterUpdate],
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    await announce(kafka_bootstrap, topics, versions[:1])
    env = _env(kafka_bootstrap, prefix, tmp_path / "home", versions)
    # Same settings, same metrics port: the twin is refused as a twin, not for the port.
    env["LORASTREAM_METRICS_PORT"] = str(free_port())
    port = free_port()
    async with contract_server("vllm", base=versions[0].base_model) as server:
        with Worker(_serve_args(server, port), env, tmp_path / "first.log") as first:
            await eventually(lambda: "tutor-v1" in server.loaded, 60, "v1 loaded")
            await eventually(lambda: "proxy listening" in first.output(), 10, "proxy")

            # The same server under another spelling of its URL, with a proxy of its own.
            same = server.url.replace("http://", "HTTP://") + "/"
            args = _serve_args(server, free_port())
            args[args.index(server.url)] = same
            second = await asyncio.to_thread(
                subprocess.run,
                [LORASTREAM, *args],
                env=first.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert second.returncode == 1, second.stderr
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1, second.stderr
            assert lines[0].startswith("ServeClash: another lorastream serve already serves ")
            assert same in lines[0] and "on this machine (pid " in lines[0], lines[0]
            assert "Traceback" not in second.stderr

            assert first.alive()
            await announce(kafka_bootstrap, topics, versions[1:2])
            await eventually(lambda: "tutor-v2" in server.loaded, 30, "v2 loaded by the first")
            await eventually(lambda: first.alive(), 1)
            status, model = await _ask(port)
            for _ in range(50):  # live once loaded and confirmed
                if model == "tutor-v2":
                    break
                await asyncio.sleep(0.1)
                status, model = await _ask(port)
            assert (status, model) == (200, "tutor-v2")
            assert first.terminate() == 0, first.output()
    assert server.loads() == ["tutor-v1", "tutor-v2"]


async def test_a_serve_elsewhere_for_the_same_server_is_found_by_its_group_member(
    kafka_bootstrap: str, prefix: str, vllm_server: ContractServer
) -> None:
    """No lock file in common (another machine): the live member in the group is the clash,
    once it has had a session timeout to leave."""
    topics = await make_topics(kafka_bootstrap, prefix)
    config = config_for(kafka_bootstrap, topics, prefix, vllm_server, session_timeout=6.0)
    async with running(config):
        # Ready is not yet joined: on a busy machine the check could run before the first
        # serve is a member, and both would serve (two started in the same second can).
        kafka = KafkaConnection(kafka_bootstrap)
        for _ in range(120):
            if await group_members(kafka, config.group_id):
                break
            await asyncio.sleep(0.5)
        elsewhere = Serve(config)
        with pytest.raises(ServeClash) as refused:
            await elsewhere.run()
    message = str(refused.value)
    assert vllm_server.url in message and config.group_id in message
    assert CLIENT_PREFIX in message and "127.0.0.1" in message


async def test_a_url_that_is_no_url_is_one_line_at_start(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    await make_topics(kafka_bootstrap, prefix)
    env = worker_env(kafka_bootstrap, prefix, tmp_path / "home")
    for url, says in [("notaurl", "no scheme"), ("ftp://gpu:21", "'ftp'"), ("http://", "no host")]:
        done = await asyncio.to_thread(
            subprocess.run,
            [LORASTREAM, "serve", "--backend", "vllm", "--url", url],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, (url, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ServeUrlError: --url "), done.stderr
        assert repr(url) in lines[0] and says in lines[0], lines[0]


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("http://GPU:8000/", "http://gpu:8000", True),
        ("http://gpu", "http://gpu:80/", True),
        ("https://gpu", "https://gpu:443", True),
        ("http://gpu:8000", "http://gpu:8001", False),
        ("http://gpu:8000", "https://gpu:8000", False),
        ("http://gpu:8000", "http://gpu-2:8000", False),
    ],
)
def test_one_server_spelt_two_ways_is_one_group_and_two_servers_are_two(
    one: str, other: str, same: bool
) -> None:
    assert (group_key(one) == group_key(other)) is same
    assert (serve_group("p.", one) == serve_group("p.", other)) is same


def test_the_group_is_readable_and_a_name_replaces_the_url() -> None:
    assert normalise_url("HTTP://Gpu:8000/v1/") == "http://gpu:8000/v1"
    assert serve_group("p.", "http://gpu:8000").startswith("p.lorastream-serve-gpu-8000-")
    assert serve_group("p.", "http://gpu:8000", "rack-3") == "p.lorastream-serve-rack-3"
    with pytest.raises(ServeUrlError, match="--name 'a b'"):
        group_key("http://gpu:8000", "a b")
