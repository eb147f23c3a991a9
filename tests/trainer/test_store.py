"""Adapter versions on disk: atomic, durable, PEFT-loadable, never pickled, checked on read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from trainer import manifest
from trainer.config import LoraSettings
from trainer.exceptions import AdapterStoreError, VersionExistsError
from trainer.lora import LoraStepper
from trainer.model import BaseModel, load_base_model
from trainer.store import (
    ADAPTER_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    OPTIMIZER_FILE,
    AdapterStore,
    sha256_file,
)

WINDOW = [("2+2=", "4"), ("capital of France:", "Paris")] * 8


@pytest.fixture
def stepper(base: BaseModel) -> LoraStepper:
    return LoraStepper(base, LoraSettings(), seed=0)


def _write(store: AdapterStore, stepper: LoraStepper, version: int = 1):
    state = stepper.initial_state()
    for _ in range(version):
        state = stepper.step(state, WINDOW).state
    return state, store.write("tutor", version, state, stepper, {"version": version})


def test_a_version_is_a_peft_directory_with_safetensors_and_json_only(
    tmp_path: Path, stepper: LoraStepper, tiny_model_dir: Path
) -> None:
    store = AdapterStore(tmp_path)
    state, stored = _write(store, stepper)
    assert stored.path == tmp_path / "tutor" / "v1"
    names = sorted(p.name for p in stored.path.iterdir())
    # PEFT's two files, the optimizer state, our metadata, the model card PEFT writes, and
    # the manifest of them all.
    expected = [
        "README.md",
        "adapter_config.json",
        ADAPTER_FILE,
        OPTIMIZER_FILE,
        METADATA_FILE,
        MANIFEST_FILE,
    ]
    assert names == sorted(expected)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert stored.sha256 == sha256_file(stored.path / ADAPTER_FILE)
    metadata = json.loads((stored.path / METADATA_FILE).read_text())
    assert metadata["sha256"] == stored.sha256 and metadata["version"] == 1
    assert [p.name for p in (tmp_path / "tutor").iterdir()] == ["v1"]  # no staging left

    # PEFT loads the directory as it is, with exactly the weights the trainer had.
    fresh = load_base_model(tiny_model_dir, torch.device("cpu"))
    model = PeftModel.from_pretrained(fresh.model, stored.path)
    loaded = {n.replace(".default.", "."): p for n, p in model.named_parameters() if "lora_" in n}
    assert set(loaded) == set(state.weights)
    assert all(torch.equal(loaded[k].detach(), state.weights[k]) for k in loaded)


def test_read_round_trips_weights_optimizer_state_and_step_count(
    tmp_path: Path, stepper: LoraStepper
) -> None:
    store = AdapterStore(tmp_path)
    state, stored = _write(store, stepper, version=2)
    back = store.read("tutor", 2, stored.sha256)
    assert back.steps == 2
    assert set(back.weights) == set(state.weights) and set(back.optimizer) == set(state.optimizer)
    assert all(torch.equal(back.weights[k], state.weights[k]) for k in state.weights)
    assert all(torch.equal(back.optimizer[k], state.optimizer[k]) for k in state.optimizer)
    # Training on from the stored state equals training on from memory.
    assert torch.equal(
        next(iter(stepper.step(back, WINDOW).state.weights.values())),
        next(iter(stepper.step(state, WINDOW).state.weights.values())),
    )


def _files(directory: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (sha256_file(p), p.stat().st_ino) for p in sorted(directory.iterdir())}


def test_the_same_version_written_again_is_kept_as_it_is(
    tmp_path: Path, stepper: LoraStepper
) -> None:
    """A window trained again after a crash gives the same files (the CPU is deterministic):
    the version on disk is kept, not replaced; a crash's staging leftover is swept."""
    store = AdapterStore(tmp_path)
    _, first = _write(store, stepper)
    before = _files(first.path)
    (tmp_path / "tutor" / ".v1.tmp-deadbeef").mkdir()  # a crash's leftover
    _, again = _write(store, stepper)
    assert again.manifest_sha256 == first.manifest_sha256 and again.sha256 == first.sha256
    assert _files(first.path) == before  # same bytes, same inodes: never rewritten
    assert sorted(p.name for p in (tmp_path / "tutor").iterdir()) == ["v1"]


def test_a_version_that_exists_with_other_content_is_never_overwritten(
    tmp_path: Path, stepper: LoraStepper
) -> None:
    store = AdapterStore(tmp_path)
    _, first = _write(store, stepper, version=2)
    before = _files(first.path)
    other = stepper.step(stepper.initial_state(), WINDOW[:4]).state  # another window's weights
    with pytest.raises(VersionExistsError) as info:
        store.write("tutor", 2, other, stepper, {"version": 2})
    message = str(info.value)
    assert str(first.path) in message and first.manifest_sha256 in message
    assert "written once" in message and "\n" not in message
    assert _files(first.path) == before
    assert sorted(p.name for p in (tmp_path / "tutor").iterdir()) == ["v2"]  # no staging left


def test_the_manifest_covers_every_file_and_the_announcement_covers_it(
    tmp_path: Path, stepper: LoraStepper
) -> None:
    store = AdapterStore(tmp_path)
    _, stored = _write(store, stepper)
    document = (stored.path / MANIFEST_FILE).read_bytes()
    assert manifest.digest_of(document) == stored.manifest_sha256
    listed = manifest.parse(document, "test")
    assert set(listed) == {p.name for p in stored.path.iterdir()} - {MANIFEST_FILE}
    store.verify("tutor", 1, stored.manifest_sha256, stored.sha256)  # passes
    for name in (OPTIMIZER_FILE, METADATA_FILE, "adapter_config.json"):
        path = stored.path / name
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit flipped
        with pytest.raises(AdapterStoreError, match="sha256 of") as info:
            store.read("tutor", 1, stored.sha256, stored.manifest_sha256)
        assert str(path) in str(info.value)
        path.write_bytes(original)
    (stored.path / "extra.bin").write_bytes(b"x")
    with pytest.raises(AdapterStoreError, match=r"extra\.bin, which its manifest does not list"):
        store.verify("tutor", 1, stored.manifest_sha256)


def test_a_corrupt_weights_file_is_an_error_naming_it(tmp_path: Path, stepper: LoraStepper) -> None:
    store = AdapterStore(tmp_path)
    _, stored = _write(store, stepper)
    weights = stored.path / ADAPTER_FILE
    weights.write_bytes(weights.read_bytes()[:-4] + b"oops")
    with pytest.raises(AdapterStoreError) as info:
        store.read("tutor", 1, stored.sha256)
    assert str(weights) in str(info.value) and "sha256" in str(info.value)


@pytest.mark.parametrize("missing", [ADAPTER_FILE, OPTIMIZER_FILE, None])
def test_a_missing_file_or_directory_is_an_error_naming_it(
    tmp_path: Path, stepper: LoraStepper, missing: str | None
) -> None:
    store = AdapterStore(tmp_path)
    _, stored = _write(store, stepper)
    if missing is None:
        for child in stored.path.iterdir():
            child.unlink()
        stored.path.rmdir()
        expected = str(stored.path)
    else:
        (stored.path / missing).unlink()
        expected = str(stored.path / missing)
    with pytest.raises(AdapterStoreError, match="is missing") as info:
        store.read("tutor", 1, stored.sha256)
    assert expected in str(info.value)


def test_an_unreadable_optimizer_file_is_an_error_naming_it(
    tmp_path: Path, stepper: LoraStepper
) -> None:
    store = AdapterStore(tmp_path)
    _, stored = _write(store, stepper)
    (stored.path / OPTIMIZER_FILE).write_bytes(b"not safetensors")
    with pytest.raises(AdapterStoreError, match=OPTIMIZER_FILE):
        store.read("tutor", 1, stored.sha256)


def test_adapter_config_is_the_same_bytes_in_every_process(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """PEFT writes target_modules in a set's order, which follows each process's string
    hashing; the store's files must not, or a replay could not match its lineage."""
    script = (
        "import sys, torch; from pathlib import Path;"
        "from trainer.config import LoraSettings; from trainer.lora import LoraStepper;"
        "from trainer.model import load_base_model;"
        "base = load_base_model(Path(sys.argv[1]), torch.device('cpu'));"
        "lora = LoraSettings(target_modules=('v_proj', 'q_proj', 'k_proj', 'o_proj'));"
        "stepper = LoraStepper(base, lora, seed=0);"
        "out = Path(sys.argv[2]); out.mkdir();"
        "stepper.save_peft(stepper.initial_state(), out)"
    )
    # Two hash seeds under which a plain set of these names iterates in different orders
    # (checked, not assumed), each saving in its own process, both at once.
    names = "{'v_proj', 'q_proj', 'k_proj', 'o_proj'}"
    orders: dict[str, str] = {}
    for hash_seed in map(str, range(1, 50)):
        shown = subprocess.run(
            [sys.executable, "-c", f"print(list({names}))"],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        orders.setdefault(shown, hash_seed)
        if len(orders) == 2:
            break
    assert len(orders) == 2, orders
    running = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tiny_model_dir), str(tmp_path / f"seed{seed}")],
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        for seed in orders.values()
    ]
    assert [process.wait(timeout=120) for process in running] == [0, 0]
    configs = {
        (tmp_path / f"seed{seed}" / "adapter_config.json").read_bytes() for seed in orders.values()
    }
    assert len(configs) == 1
    modules = json.loads(configs.pop())["target_modules"]
    assert modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
