"""serve with versions announced on an object store (a real S3Proxy): each is fetched into
serve's cache, checked there, and the server loads the local copy; a version whose upload
never finished (no manifest) is refused and never loaded."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from lorastream.dev.topics import make_topics
from schemas import AdapterUpdate, Topics
from tests.serving.contract import ContractServer
from tests.serving.helpers import announce, config_for, eventually, running
from trainer.objects import MANIFEST_FILE, upload_version

pytestmark = pytest.mark.integration


def _refusals(serve: Any, reason: str) -> float:
    value = serve.metrics.registry.get_sample_value(
        "lorastream_serve_refusals_total", {"adapter": "tutor", "reason": reason}
    )
    return value or 0.0


@pytest.mark.timeout(90)
async def test_serve_fetches_versions_from_the_object_store_and_refuses_a_torn_one(
    kafka_bootstrap: str,
    prefix: str,
    server: ContractServer,
    versions: list[AdapterUpdate],
    s3_env: Any,
    tmp_path: Path,
) -> None:
    url = f"{s3_env.bucket('serving')}/{uuid.uuid4().hex[:6]}"
    remote = []
    for update in versions[:3]:
        uri = f"{url}/tutor/v{update.version}"
        upload_version(Path(update.uri), uri)
        remote.append(update.model_copy(update={"uri": uri}))
    # v3's upload was torn: its files are there, its manifest is not.
    (s3_env.data / remote[2].uri.removeprefix("s3://") / MANIFEST_FILE).unlink()

    topics = await make_topics(kafka_bootstrap, prefix)
    await announce(kafka_bootstrap, topics, remote[:2])
    cache = tmp_path / "serve-cache"
    config = config_for(kafka_bootstrap, topics, prefix, server, keep=2, cache_dir=cache)
    async with running(config) as serve:
        await eventually(lambda: serve.live("tutor") == "tutor-v2", what="v2 live")
        assert server.loaded["tutor-v2"] == str(cache / remote[1].uri.removeprefix("s3://"))
        assert (Path(server.loaded["tutor-v2"]) / "adapter_model.safetensors").is_file()

        await announce(kafka_bootstrap, topics, [remote[2]])
        await eventually(lambda: _refusals(serve, "missing") == 1, what="v3 refused")
        assert serve.live("tutor") == "tutor-v2"
    assert "tutor-v3" not in server.loads()


def test_adapters_fetch_gives_a_checked_local_copy_that_peft_loads(
    kafka_bootstrap: str,
    prefix: str,
    versions: list[AdapterUpdate],
    trained: Any,
    s3_env: Any,
    tmp_path: Path,
) -> None:
    import asyncio
    import os
    import subprocess

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorastream.dev.workers import LORASTREAM

    s3 = s3_env
    url = f"{s3.bucket('fetching')}/{uuid.uuid4().hex[:6]}"
    remote = []
    for update in versions[:3]:
        uri = f"{url}/tutor/v{update.version}"
        upload_version(Path(update.uri), uri)
        remote.append(update.model_copy(update={"uri": uri}))

    async def setup(updates: list[AdapterUpdate]) -> None:
        topics = await make_topics(kafka_bootstrap, prefix)
        await announce(kafka_bootstrap, topics, updates)

    asyncio.run(setup(remote[:2]))
    cache = tmp_path / "cache"
    env = {
        **os.environ,
        **s3.environment(),
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "LORASTREAM_TOPIC_PREFIX": prefix,
        "LORASTREAM_ADAPTER_CACHE": str(cache),
        "LORASTREAM_ADAPTER_DIR": url,
    }

    def fetch(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [LORASTREAM, "adapters", "fetch", "tutor", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    newest = fetch()
    assert newest.returncode == 0, newest.stderr
    path = Path(newest.stdout.strip())
    assert path == cache / remote[1].uri.removeprefix("s3://")
    base = AutoModelForCausalLM.from_pretrained(str(trained.model_dir))
    PeftModel.from_pretrained(base, str(path))
    assert Path(fetch("--version", "1").stdout.strip()) == cache / remote[0].uri.removeprefix(
        "s3://"
    )

    (s3.data / remote[2].uri.removeprefix("s3://") / MANIFEST_FILE).unlink()
    asyncio.run(announce(kafka_bootstrap, Topics.named(prefix), [remote[2]]))
    torn = fetch()
    assert torn.returncode == 1
    assert len(torn.stderr.strip().splitlines()) == 1, torn.stderr
    assert "manifest.json is missing" in torn.stderr and "never finished" in torn.stderr
