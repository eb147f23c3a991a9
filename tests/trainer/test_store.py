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

from trainer.exceptions import AdapterStoreError
from trainer.lora import LoraSettings, LoraStepper
from trainer.model import BaseModel, load_base_model
from trainer.store import ADAPTER_FILE, METADATA_FILE, OPTIMIZER_FILE, AdapterStore, sha256_file

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
    # PEFT's two files, the optimizer state, our metadata, and the model card PEFT writes.
    expected = ["README.md", "adapter_config.json", ADAPTER_FILE, OPTIMIZER_FILE, METADATA_FILE]
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


def test_rewriting_a_version_replaces_it_whole(tmp_path: Path, stepper: LoraStepper) -> None:
    store = AdapterStore(tmp_path)
    _write(store, stepper)
    (tmp_path / "tutor" / ".v1.tmp-deadbeef").mkdir()  # a crash's leftover
    (tmp_path / "tutor" / "v1" / "stray.bin").write_bytes(b"x")
    _, stored = _write(store, stepper)
    assert sorted(p.name for p in (tmp_path / "tutor").iterdir()) == ["v1"]
    assert not (stored.path / "stray.bin").exists()


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
        "from trainer.lora import LoraSettings, LoraStepper;"
        "from trainer.model import load_base_model;"
        "base = load_base_model(Path(sys.argv[1]), torch.device('cpu'));"
        "lora = LoraSettings(target_modules=('v_proj', 'q_proj', 'k_proj', 'o_proj'));"
        "stepper = LoraStepper(base, lora, seed=0);"
        "out = Path(sys.argv[2]); out.mkdir();"
        "stepper.save_peft(stepper.initial_state(), out)"
    )
    configs = set()
    for hash_seed in ("1", "2", "3", "4"):
        out = tmp_path / f"seed{hash_seed}"
        subprocess.run(
            [sys.executable, "-c", script, str(tiny_model_dir), str(out)],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            check=True,
            timeout=120,
        )
        configs.add((out / "adapter_config.json").read_bytes())
    assert len(configs) == 1
    modules = json.loads(configs.pop())["target_modules"]
    assert modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
