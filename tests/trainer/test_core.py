"""The window-training core on its own: a window and a lineage in, an outcome out; no Kafka."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from lorastream.dev.events import learning_event
from schemas import (
    AdapterUpdate,
    QuarantineRecord,
    encode,
)
from tests.trainer.cores import cpu_core
from trainer.core import Trained, WindowTrainer
from trainer.exceptions import TrainerError
from trainer.lineage import Lineage, apply_records, lineages_from
from trainer.model import build_tiny_model_dir, load_base_model
from trainer.store import sha256_file
from trainer.window import Window, Windows

TP = TopicPartition("learning-events", 0)


def _windows(adapter: str, count: int, size: int = 4) -> list[Window]:
    windows = Windows(size)
    lineage = Lineage(adapter)
    closed = []
    for n in range(count * size):
        _, window = windows.offer(TP, n, learning_event(adapter, n), lineage)
        if window is not None:
            closed.append(window)
    return closed


def _core(model_dir: Path, adapters: Path, **more: object) -> WindowTrainer:
    return cpu_core(model_dir, adapters, 4, **more)


def test_a_window_becomes_the_next_version_of_the_lineage_it_is_given(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    core = _core(tiny_model_dir, tmp_path)
    lineage = Lineage("renamed")  # events of "source", trained into another lineage
    first, second = _windows("source", 2)

    outcome = core.train(first, lineage)
    assert isinstance(outcome, Trained)
    update = outcome.update
    assert (update.adapter, update.version, update.parent_version) == ("renamed", 1, None)
    assert update.window == first.spec() and update.window.event_ids == first.ids
    assert update.base_model_fingerprint == core.base.fingerprint
    directory = tmp_path / "renamed" / "v1"
    assert update.uri == str(directory.resolve())
    assert update.sha256 == sha256_file(directory / "adapter_model.safetensors")
    assert lineage.version == 0, "nothing is recorded before the driver commits"

    lineage.record(outcome.update)
    assert lineage.version == 1 and lineage.trained_ids == set(first.ids)
    assert lineage.is_handled(TP, first.last_offset)
    again = core.train(second, lineage)
    assert isinstance(again, Trained)
    assert (again.update.version, again.update.parent_version) == (2, 1)


def test_the_same_windows_give_the_same_files_in_any_lineage(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    digests = {}
    for name in ("one", "two"):
        core = _core(tiny_model_dir, tmp_path / name)
        lineage = Lineage(name)
        for window in _windows("source", 2):
            outcome = core.train(window, lineage)
            assert isinstance(outcome, Trained)
            lineage.record(outcome.update)
        digests[name] = [u.sha256 for u in lineage.updates]
    assert digests["one"] == digests["two"]
    assert digests["one"][0] != digests["one"][1]


def test_a_window_that_fails_every_try_comes_back_as_a_quarantine_record(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    (window,) = _windows("tutor", 1)
    core = _core(tiny_model_dir, tmp_path, faults=f"nan:{window.ids[2]}", max_tries=2)
    lineage = Lineage("tutor")
    outcome = core.train(window, lineage)
    assert isinstance(outcome, QuarantineRecord)
    assert outcome.adapter == "tutor" and outcome.tries == 2
    assert outcome.window == window.spec()
    assert [e.id for e in outcome.events] == window.ids
    assert "NonFiniteLossError" in outcome.error and "try 2" in outcome.error
    assert not (tmp_path / "tutor" / "v1").exists()
    lineage.record(outcome)
    assert lineage.version == 0 and lineage.quarantined == 1
    assert lineage.is_handled(TP, window.last_offset)


def test_a_lineage_on_another_base_model_is_refused_by_name(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    core = _core(tiny_model_dir, tmp_path)
    lineage = Lineage("tutor")
    (window,) = _windows("tutor", 1)
    outcome = core.train(window, lineage)
    assert isinstance(outcome, Trained)
    lineage.record(outcome.update)

    other_dir = build_tiny_model_dir(tmp_path / "other-base", seed=7)
    other = WindowTrainer(core.config, load_base_model(other_dir, torch.device("cpu"), "other"))
    with pytest.raises(TrainerError, match=r"tutor v1 was trained on base model tiny .*other"):
        other.state_of(lineage)


def test_windows_admit_each_event_once_per_lineage() -> None:
    windows = Windows(3)
    lineage = Lineage("a")
    assert windows.offer(TP, 0, learning_event("a", 0), lineage) == (True, None)
    in_the_open_window = learning_event("a", 0)
    assert windows.offer(TP, 1, in_the_open_window, lineage) == (False, None)
    assert windows.offer(TP, 2, learning_event("a", 1), lineage)[0]
    admitted, closed = windows.offer(TP, 3, learning_event("a", 2), lineage)
    assert admitted and closed is not None and closed.ids == ["a-000", "a-001", "a-002"]
    lineage.record_window(closed.spec())
    windows.settle(closed)  # committed, as the driver does
    assert windows.offer(TP, 4, learning_event("a", 1), lineage) == (False, None)  # already trained
    assert windows.offer(TP, 2, learning_event("a", 9), lineage) == (False, None)  # offset handled
    assert windows.committable() == {TP: 5}


def _record(topic: str, offset: int, value: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=topic,
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"tutor",
        value=value,
        checksum=None,
        serialized_key_size=5,
        serialized_value_size=len(value),
        headers=(),
    )


def test_lineages_are_rebuilt_once_whatever_is_read_twice(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A refresh that reads records this process already applied changes nothing."""
    core = _core(tiny_model_dir, tmp_path, faults="nan:tutor-004", max_tries=1)
    lineage = Lineage("tutor")
    updates, quarantined = [], []
    for window in _windows("tutor", 3):
        outcome = core.train(window, lineage)
        lineage.record(outcome.update if isinstance(outcome, Trained) else outcome)
        if isinstance(outcome, Trained):
            updates.append(_record("adapter-updates", len(updates), encode(outcome.update)))
        else:
            quarantined.append(_record("quarantine", len(quarantined), encode(outcome)))
    assert [u.version for u in lineage.updates] == [1, 2] and lineage.quarantined == 1

    rebuilt = lineages_from(updates, quarantined)["tutor"]
    lineages = {"tutor": rebuilt}
    apply_records(lineages, updates, quarantined)  # everything again
    for copy in (rebuilt, lineages["tutor"]):
        assert copy.updates == lineage.updates
        assert copy.quarantined == 1
        assert copy.handled == lineage.handled and copy.trained_ids == lineage.trained_ids
    assert isinstance(lineage.latest, AdapterUpdate)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_an_announcement_alone_loads_with_peft_and_its_files_honour_the_umask(
    tmp_path: Path, umask: int
) -> None:
    """From the AdapterUpdate's own fields, a server finds and loads both the base model
    and the adapter (no hub name, no file:// URL), and reads files written under the
    process's umask (safetensors alone writes 0600)."""
    import os

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorastream.settings import load_settings
    from lorastream.stages import training_config

    settings = load_settings(
        home=tmp_path / "home", adapter_dir=tmp_path / "adapters", window_size=4, device="cpu"
    )
    previous = os.umask(umask)
    try:
        core = WindowTrainer.load(training_config(settings))
        outcome = core.train(_windows("tutor", 1)[0], Lineage("tutor"))
    finally:
        os.umask(previous)
    assert isinstance(outcome, Trained)
    update = outcome.update
    assert Path(update.base_model).is_absolute() and Path(update.uri).is_absolute()

    base = AutoModelForCausalLM.from_pretrained(update.base_model)
    model = PeftModel.from_pretrained(base, update.uri)
    stored = load_file(str(Path(update.uri) / "adapter_model.safetensors"))
    loaded = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert len(loaded) == len(stored) > 0
    for key, tensor in stored.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(loaded[name], tensor), key

    directory = Path(update.uri)
    assert (directory.stat().st_mode & 0o777) == 0o777 & ~umask
    for entry in directory.iterdir():
        assert (entry.stat().st_mode & 0o777) == 0o666 & ~umask, entry.name
