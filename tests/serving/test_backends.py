"""The backends against the contract servers, and the checks on an adapter's files. No Kafka."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorastream.serving.backends import Loaded, ModelCard, make
from lorastream.serving.exceptions import BackendRefused, BackendUnavailable
from lorastream.serving.verify import check_base, check_files
from schemas import AdapterUpdate
from tests.serving.contract import ContractServer

pytestmark = pytest.mark.timeout(30)


async def test_load_and_unload_may_be_repeated(
    server: ContractServer, versions: list[AdapterUpdate]
) -> None:
    async with make(server.kind, server.url) as backend:
        assert await backend.load("tutor-v1", versions[0].uri) is Loaded.NEW
        assert await backend.load("tutor-v1", versions[0].uri) is Loaded.ALREADY
        assert (await backend.base()).id == server.base
        expected = {"tutor-v1"} if server.kind == "vllm" else None
        assert await backend.adapters() == expected
        assert await backend.unload("tutor-v1") is True
        assert await backend.unload("tutor-v1") is False
        with pytest.raises(BackendRefused, match="no-such-dir"):
            await backend.load("tutor-v9", "/no-such-dir")
    assert server.loads() == ["tutor-v1"] and server.unloads() == ["tutor-v1"]


async def test_a_server_that_is_down_or_answers_5xx_is_unavailable(
    server: ContractServer,
) -> None:
    async with make(server.kind, server.url) as backend:
        server.failing = 503
        with pytest.raises(BackendUnavailable, match="HTTP 503"):
            await backend.models()
        server.failing = None
        await server.down()
        with pytest.raises(BackendUnavailable, match=f"inference server at {server.url}"):
            await backend.load("tutor-v1", "/x")
        await server.up()
        assert (await backend.base()).parent is None


def _config(update: AdapterUpdate, **changes: object) -> AdapterUpdate:
    """The version with ``changes`` in its config, as a trainer that wrote such a config
    would have announced it (the manifest made again, its sha256 in the announcement)."""
    from trainer import manifest

    directory = Path(update.uri)
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    document = manifest.build(directory)
    (directory / manifest.MANIFEST_FILE).write_bytes(document)
    return update.model_copy(update={"manifest_sha256": manifest.digest_of(document)})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"r": 32}, "rank"),
        ({"rank_pattern": {"q_proj": 64}}, "rank"),
        ({"bias": "lora_only"}, "bias"),
        ({"r": "eight"}, "config"),
    ],
)
def test_a_config_the_server_cannot_load_is_refused(
    versions: list[AdapterUpdate], changes: dict[str, object], reason: str
) -> None:
    assert check_files(versions[0], 16) is None
    changed = _config(versions[0], **changes)
    refusal = check_files(changed, 16)
    assert refusal is not None and refusal.reason == reason
    assert "adapter_config.json" in refusal.detail
    # The same files under the original announcement: they are not what it announced.
    refusal = check_files(versions[0], 16)
    assert refusal is not None and refusal.reason == "manifest"
    assert "manifest.json" in refusal.detail


def test_any_file_not_as_its_manifest_lists_is_refused(versions: list[AdapterUpdate]) -> None:
    optimizer = Path(versions[0].uri) / "optimizer.safetensors"
    data = bytearray(optimizer.read_bytes())
    data[-1] ^= 1
    optimizer.write_bytes(bytes(data))
    refusal = check_files(versions[0], 16)
    assert refusal is not None and refusal.reason == "manifest"
    assert str(optimizer) in refusal.detail and "sha256" in refusal.detail


def test_missing_weights_are_refused(versions: list[AdapterUpdate]) -> None:
    (Path(versions[0].uri) / "adapter_model.safetensors").unlink()
    refusal = check_files(versions[0], 16)
    assert refusal is not None and refusal.reason == "missing"


def test_the_base_model_matches_by_path_or_by_a_declared_id(
    versions: list[AdapterUpdate],
) -> None:
    update = versions[0]
    assert check_base(update, ModelCard(update.base_model, update.base_model, None)) is None
    assert check_base(update, ModelCard("llama", update.base_model + "/", None)) is None
    other = ModelCard("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B", None)
    refusal = check_base(update, other)
    assert refusal is not None and refusal.reason == "base_model"
    assert check_base(update, other, "meta-llama/Llama-3.1-8B") is None
    assert check_base(update, other, "meta-llama/Llama-3.1-8B", update.base_model) is None
    wrong = check_base(update, other, "meta-llama/Llama-3.1-8B", "/models/elsewhere")
    assert wrong is not None and "/models/elsewhere" in wrong.detail
    assert check_base(update, other, "another-id") is not None
