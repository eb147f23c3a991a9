"""Adapter versions on a real S3-compatible server (S3Proxy): written by one trainer,
resumed by another with its own cache, never read without their manifest."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import obstore
import pytest
from aiokafka import TopicPartition

from lorastream.dev.events import learning_event
from trainer.config import TrainingConfig
from trainer.core import Trained, WindowTrainer
from trainer.exceptions import AdapterStoreError, ResourceError
from trainer.lineage import Lineage
from trainer.objects import MANIFEST_FILE, fetch_version
from trainer.window import Windows

pytestmark = pytest.mark.integration

TP = TopicPartition("learning-events", 0)


def _core(model_dir: Path, url: str, cache: Path) -> WindowTrainer:
    return WindowTrainer.load(
        TrainingConfig(
            adapter_dir=url,
            base_model=model_dir,
            base_model_name="tiny",
            window_size=4,
            device="cpu",
            cache_dir=cache,
        )
    )


def _train(core: WindowTrainer, lineage: Lineage, first: int, count: int) -> list[Trained]:
    windows, out = Windows(4), []
    for n in range(first, first + count):
        _, window = windows.offer(TP, n, learning_event(lineage.adapter, n), lineage)
        if window is not None:
            outcome = core.train(window, lineage)
            assert isinstance(outcome, Trained)
            lineage.record(outcome.update)
            out.append(outcome)
    return out


def _url(s3: Any) -> str:
    return f"{s3.bucket('adapters')}/run-{uuid.uuid4().hex[:6]}"


def test_a_version_is_announced_by_its_url_and_another_machine_resumes_from_it(
    s3_env: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = _url(s3_env)
    one = _core(tiny_model_dir, url, tmp_path / "cache-one")
    lineage = Lineage("tutor")
    trained = _train(one, lineage, 0, 8)
    assert [t.update.uri for t in trained] == [f"{url}/tutor/v1", f"{url}/tutor/v2"]
    store = obstore.store.from_url(f"{url}/tutor/v2")
    listed = {m["path"] for batch in obstore.list(store) for m in batch}
    assert MANIFEST_FILE in listed and "adapter_model.safetensors" in listed

    # Another trainer, its cache empty, continues the lineage from the bucket: its v3 is
    # bit for bit the v3 of the first.
    other = _core(tiny_model_dir, url, tmp_path / "cache-two")
    theirs = Lineage("tutor")
    for t in trained:
        theirs.record_update(t.update)
    mine = _train(one, lineage, 8, 4)[0].update
    resumed = _train(other, theirs, 8, 4)[0].update
    assert resumed.version == mine.version == 3
    assert resumed.sha256 == mine.sha256
    assert (tmp_path / "cache-two" / "adapters").is_dir()


def test_a_version_without_its_manifest_does_not_exist(
    s3_env: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = _url(s3_env)
    core = _core(tiny_model_dir, url, tmp_path / "cache")
    lineage = Lineage("tutor")
    update = _train(core, lineage, 0, 4)[0].update
    # A torn upload: the files, no manifest (S3Proxy's filesystem backend holds each
    # object as a file; it does not implement obstore's DELETE headers).
    (s3_env.data / update.uri.removeprefix("s3://") / MANIFEST_FILE).unlink()
    with pytest.raises(AdapterStoreError, match=r"manifest\.json is missing: .* never finished"):
        fetch_version(update.uri, tmp_path / "elsewhere")
    fresh = _core(tiny_model_dir, url, tmp_path / "other-cache")
    with pytest.raises(AdapterStoreError, match=r"manifest\.json is missing"):
        fresh.store.read("tutor", 1, update.sha256)


def test_a_changed_object_is_refused_by_its_sha256(
    s3_env: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = _url(s3_env)
    core = _core(tiny_model_dir, url, tmp_path / "cache")
    update = _train(core, Lineage("tutor"), 0, 4)[0].update
    obstore.put(obstore.store.from_url(update.uri), "adapter_model.safetensors", b"not this")
    with pytest.raises(
        AdapterStoreError, match=r"adapter_model\.safetensors has sha256 .* changed"
    ):
        fetch_version(update.uri, tmp_path / "elsewhere")


def test_an_unreachable_store_is_a_resource_to_wait_for(
    s3_env: Any, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the window's fault: the trainer waits and tries again (as for a full disk)."""
    from lorastream.dev.ports import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    core = _core(tiny_model_dir, _url(s3_env), tmp_path / "cache")
    with pytest.raises(ResourceError, match="cannot upload"):
        _train(core, Lineage("tutor"), 0, 4)


def test_a_version_on_the_store_is_written_once_and_its_manifest_never_overwritten(
    s3_env: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A second writer of tutor v1 (another window, another cache) is refused before it
    uploads anything. (Its manifest would also go with If-None-Match: *, which S3 honours;
    S3Proxy 2.6.0 ignores that header, so the look before the upload is what this shows.)"""
    from trainer import manifest
    from trainer.exceptions import AdapterHeld

    url = _url(s3_env)
    one = _core(tiny_model_dir, url, tmp_path / "cache-one")
    first = _train(one, Lineage("tutor"), 0, 4)[0].update
    store = obstore.store.from_url(f"{url}/tutor/v1")
    before = {m["path"]: m["e_tag"] for batch in obstore.list(store) for m in batch}

    other = _core(tiny_model_dir, url, tmp_path / "cache-two")
    lineage = Lineage("tutor")
    windows = Windows(4)
    for n in range(100, 104):  # other events: other weights for the same version number
        _, window = windows.offer(TP, n, learning_event("tutor", n), lineage)
    assert window is not None
    with pytest.raises(AdapterHeld, match=r"tutor/v1 already exists .*written once"):
        other.train(window, lineage)
    after = {m["path"]: m["e_tag"] for batch in obstore.list(store) for m in batch}
    assert after == before  # not one object of the announced version was touched
    fetched = fetch_version(first.uri, tmp_path / "cache-three")
    assert first.manifest_sha256 is not None
    manifest.verify(fetched, "tutor v1", first.manifest_sha256, first.sha256)
