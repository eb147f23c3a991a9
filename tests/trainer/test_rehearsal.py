"""Rehearsal: each step mixes a sample of the adapter's earlier events into its window.

The buffer is a reservoir over the lineage's trained events, written with each
version; the sample is drawn from the parent's buffer. Both are functions of the
seed, the version number and the event ids alone, so a restart, another trainer
and a replay into another name make the same files. Off (0), nothing differs
from a trainer without the feature.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import orjson
import pytest
import torch
from aiokafka import TopicPartition
from safetensors.torch import load_file

from lorastream.dev.events import learning_event
from schemas import AdapterUpdate, LearningEvent, RehearsalSpec, decode, encode, schema_document
from tests.trainer.cores import cpu_core
from trainer.config import LoraSettings, TrainingConfig
from trainer.core import Trained, WindowTrainer
from trainer.exceptions import AdapterStoreError
from trainer.lineage import Lineage
from trainer.lora import LoraStepper
from trainer.model import load_base_model
from trainer.rehearsal import (
    Buffer,
    Rehearsed,
    decode_buffer,
    encode_buffer,
    extend_buffer,
    sample,
    sample_digest,
)
from trainer.store import REHEARSAL_FILE, AdapterStore
from trainer.window import Windows

TP = TopicPartition("learning-events", 0)
WINDOW = 8
K = 4
SIZE = 8
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors")


def _offered(count: int, start: int = 0) -> list[Rehearsed]:
    return [Rehearsed(f"e{n}", f"p{n}", f"r{n}") for n in range(start, start + count)]


def _events(count: int) -> list[LearningEvent]:
    return [learning_event("tutor", n) for n in range(count)]


def _core(model_dir: Path, adapters: Path, **more: object) -> WindowTrainer:
    return cpu_core(model_dir, adapters, WINDOW, **more)


def _drive(
    core: WindowTrainer,
    lineage: Lineage,
    events: list[LearningEvent],
    start: int = 0,
    versions: int | None = None,
) -> None:
    """The live loop without Kafka, from offset ``start``; stops after ``versions``."""
    windows = Windows(WINDOW)
    for offset in range(start, len(events)):
        _, closed = windows.offer(TP, offset, events[offset], lineage)
        if closed is None:
            continue
        outcome = core.train(closed, lineage)
        assert isinstance(outcome, Trained), outcome
        lineage.record(outcome.update)
        windows.settle(closed)
        if versions is not None and lineage.version >= versions:
            return


def _files(adapters: Path, adapter: str, version: int, names: tuple[str, ...]) -> dict[str, str]:
    directory = adapters / adapter / f"v{version}"
    return {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in names
        if (directory / name).exists()
    }


def _buffer(adapters: Path, adapter: str, version: int) -> Buffer:
    path = adapters / adapter / f"v{version}" / REHEARSAL_FILE
    return decode_buffer(path.read_bytes(), str(path))


# ── the buffer and the sample, as values ─────────────────────────────────────


def test_the_reservoir_keeps_at_most_its_size_and_depends_on_the_seed_and_ids_alone() -> None:
    offered = _offered(100)
    whole = extend_buffer(Buffer(), offered, SIZE, seed=0)
    assert whole.seen == 100 and len(whole.events) == SIZE
    assert len({e.id for e in whole.events}) == SIZE
    assert {e.id for e in whole.events} - {f"e{n}" for n in range(SIZE)}, "nothing replaced"

    # Offered window by window (each version's file read back), or all at once: the same.
    stepwise = Buffer()
    for first in range(0, 100, 16):
        data = encode_buffer(extend_buffer(stepwise, offered[first : first + 16], SIZE, 0))
        stepwise = decode_buffer(data, "test")
    assert encode_buffer(stepwise) == encode_buffer(whole)
    assert encode_buffer(extend_buffer(Buffer(), offered, SIZE, seed=0)) == encode_buffer(whole)
    assert extend_buffer(Buffer(), offered, SIZE, seed=1) != whole, "the seed is not used"
    # The ids decide, not the texts: a replay trains the same ids.
    retexted = [Rehearsed(e.id, "other", "texts") for e in offered]
    assert [e.id for e in extend_buffer(Buffer(), retexted, SIZE, 0).events] == [
        e.id for e in whole.events
    ]

    # Algorithm R keeps each of n events with chance size/n: over 400 seeds, 40 events.
    kept: Counter[str] = Counter()
    for seed in range(400):
        kept.update(e.id for e in extend_buffer(Buffer(), _offered(40), SIZE, seed).events)
    expected = 400 * SIZE / 40
    assert all(0.6 * expected < kept[f"e{n}"] < 1.4 * expected for n in range(40)), kept


def test_the_file_is_seen_then_one_event_per_line() -> None:
    buffer = extend_buffer(Buffer(), _offered(3), 2, seed=0)
    assert buffer.seen == 3
    data = encode_buffer(buffer)
    lines = data.split(b"\n")
    assert lines[0] == b'{"seen":3}' and lines[-1] == b"" and len(lines) == 4
    assert all(list(orjson.loads(line)) == ["id", "prompt", "response"] for line in lines[1:3])
    assert decode_buffer(data, "x") == buffer
    assert decode_buffer(encode_buffer(Buffer()), "x") == Buffer()
    with pytest.raises(AdapterStoreError, match=r"^v3/rehearsal.jsonl:3: not a rehearsal event"):
        decode_buffer(
            b'{"seen":5}\n{"id":"a","prompt":"p","response":"r"}\n{"id":1}\n', "v3/rehearsal.jsonl"
        )
    with pytest.raises(AdapterStoreError, match=r"^f:1: not a rehearsal buffer's head"):
        decode_buffer(b'{"seen":-1}\n', "f")
    with pytest.raises(AdapterStoreError, match=r"^f:1: holds 1 events but has seen 0"):
        decode_buffer(b'{"seen":0}\n{"id":"a","prompt":"p","response":"r"}\n', "f")


def test_the_sample_depends_on_the_seed_and_version_and_comes_from_the_buffer() -> None:
    buffer = extend_buffer(Buffer(), _offered(50), 16, seed=0)
    drawn = sample(buffer, K, seed=0, version=7)
    assert drawn == sample(buffer, K, seed=0, version=7)
    assert len(drawn) == K and len(set(drawn)) == K and set(drawn) <= set(buffer.events)
    others = {tuple(e.id for e in sample(buffer, K, 0, v)) for v in range(1, 20)}
    assert len(others) > 15, "the version does not change the sample"
    assert sample(buffer, K, seed=1, version=7) != drawn
    assert sample(buffer, 100, 0, 7) and set(sample(buffer, 100, 0, 7)) == set(buffer.events)
    assert sample(buffer, 0, 0, 7) == [] and sample(Buffer(), K, 0, 7) == []
    assert (
        sample_digest(drawn) == hashlib.sha256("\n".join(e.id for e in drawn).encode()).hexdigest()
    )


# ── through the trainer's core ───────────────────────────────────────────────


def test_with_rehearsal_off_the_step_files_and_announcements_are_those_of_before(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rehearsal 0 (whatever the buffer size): the stepper sees the window alone, no file or
    key is written, ``rehearsal`` is null, and the weights are bit for bit those of the
    stepper alone on each window: what the trainer made before the feature existed."""
    seen: list[list[tuple[str, str]]] = []
    real_step = LoraStepper.step

    def spy(self: LoraStepper, state: object, examples: list[tuple[str, str]]) -> object:
        seen.append(list(examples))
        return real_step(self, state, examples)  # type: ignore[arg-type]

    monkeypatch.setattr(LoraStepper, "step", spy)
    events = _events(3 * WINDOW)
    core = _core(tiny_model_dir, tmp_path / "adapters", rehearsal=0, rehearsal_buffer=3)
    lineage = Lineage("tutor")
    _drive(core, lineage, events)
    assert lineage.version == 3
    assert seen == [[(e.prompt, e.response) for e in events[k : k + WINDOW]] for k in (0, 8, 16)]

    monkeypatch.setattr(LoraStepper, "step", real_step)
    base = load_base_model(tiny_model_dir, torch.device("cpu"))
    stepper = LoraStepper(base, LoraSettings(), seed=0)
    reference = AdapterStore(tmp_path / "reference")
    state = stepper.initial_state()
    for update, examples in zip(lineage.updates, seen, strict=True):
        assert update.rehearsal is None
        assert b'"rehearsal":null' in encode(update)
        directory = tmp_path / "adapters" / "tutor" / f"v{update.version}"
        assert not (directory / REHEARSAL_FILE).exists()
        metadata = orjson.loads((directory / "lorastream.json").read_bytes())
        assert not [key for key in metadata if key.startswith("rehearsal")]
        assert REHEARSAL_FILE not in metadata["files"]
        state = stepper.step(state, examples).state
        reference.write("tutor", update.version, state, stepper, {})
        assert _files(tmp_path / "reference", "tutor", update.version, PEFT_FILES) == _files(
            tmp_path / "adapters", "tutor", update.version, PEFT_FILES
        )


def test_each_step_mixes_a_sample_of_the_parents_buffer_into_its_window(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[list[tuple[str, str]]] = []
    real_step = LoraStepper.step

    def spy(self: LoraStepper, state: object, examples: list[tuple[str, str]]) -> object:
        batches.append(list(examples))
        return real_step(self, state, examples)  # type: ignore[arg-type]

    monkeypatch.setattr(LoraStepper, "step", spy)
    events = _events(4 * WINDOW)
    by_id = {e.id: e for e in events}
    adapters = tmp_path / "on"
    lineage = Lineage("tutor")
    _drive(_core(tiny_model_dir, adapters, rehearsal=K, rehearsal_buffer=SIZE), lineage, events)
    assert lineage.version == 4
    monkeypatch.setattr(LoraStepper, "step", real_step)
    off = Lineage("tutor")
    _drive(_core(tiny_model_dir, tmp_path / "off"), off, events)

    for update, batch in zip(lineage.updates, batches, strict=True):
        window = [(by_id[i].prompt, by_id[i].response) for i in update.window.event_ids]
        assert batch[:WINDOW] == window
        buffer = _buffer(adapters, "tutor", update.version)
        trained = [i for u in lineage.updates[: update.version] for i in u.window.event_ids]
        assert buffer.seen == len(trained) and len(buffer.events) == min(SIZE, len(trained))
        assert {e.id for e in buffer.events} <= set(trained)
        metadata = orjson.loads(
            (adapters / "tutor" / f"v{update.version}" / "lorastream.json").read_bytes()
        )
        assert (metadata["rehearsal"], metadata["rehearsal_buffer"]) == (K, SIZE)
        assert REHEARSAL_FILE in metadata["files"]
        if update.version == 1:  # nothing earlier to rehearse
            assert batch == window
            assert update.rehearsal == RehearsalSpec(events=0, digest=sample_digest([]))
            continue
        drawn = sample(_buffer(adapters, "tutor", update.version - 1), K, 0, update.version)
        assert len(batch) == WINDOW + K
        assert batch[WINDOW:] == [e.example for e in drawn]
        assert update.rehearsal == RehearsalSpec(events=K, digest=sample_digest(drawn))
        assert [by_id[e.id].prompt for e in drawn] == [p for p, _ in batch[WINDOW:]]
        assert set(e.id for e in drawn) <= set(trained) - set(update.window.event_ids)

    # v1 rehearsed nothing and is the same version; from v2 on the weights are others.
    def weights(root: Path, version: int) -> dict[str, torch.Tensor]:
        return load_file(root / "tutor" / f"v{version}" / "adapter_model.safetensors")

    assert lineage.updates[0].sha256 == off.updates[0].sha256
    for version in (2, 4):
        mine, theirs = weights(adapters, version), weights(tmp_path / "off", version)
        assert any(not torch.equal(mine[k], theirs[k]) for k in mine), version
    # The buffer's last version has replaced some of the first window's events.
    assert {e.id for e in _buffer(adapters, "tutor", 4).events} - set(
        lineage.updates[0].window.event_ids
    )


def test_another_name_a_restart_and_an_empty_cache_give_the_same_files(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The same events trained as ``tutor`` uninterrupted, as ``renamed`` (a replay's new
    name), and as ``tutor`` by a trainer stopped after v2 and a new one that reads v2's files
    alone: every file of every version the same, bit for bit."""
    events = _events(5 * WINDOW)
    names = (*PEFT_FILES, REHEARSAL_FILE)
    config = {"rehearsal": K, "rehearsal_buffer": SIZE}

    whole = Lineage("tutor")
    _drive(_core(tiny_model_dir, tmp_path / "whole", **config), whole, events)
    renamed = Lineage("renamed")
    _drive(_core(tiny_model_dir, tmp_path / "renamed", **config), renamed, events)

    first = Lineage("tutor")
    _drive(_core(tiny_model_dir, tmp_path / "restarted", **config), first, events, versions=2)
    resumed = Lineage("tutor")  # as read back from adapter-updates
    for update in first.updates:
        resumed.record_update(update)
    again = _core(tiny_model_dir, tmp_path / "restarted", **config)
    _drive(again, resumed, events, start=2 * WINDOW)

    assert whole.version == renamed.version == resumed.version == 5
    for version in range(1, 6):
        files = _files(tmp_path / "whole", "tutor", version, names)
        assert len(files) == len(names)
        assert _files(tmp_path / "renamed", "renamed", version, names) == files, version
        assert _files(tmp_path / "restarted", "tutor", version, names) == files, version
        expected = whole.updates[version - 1].rehearsal
        assert renamed.updates[version - 1].rehearsal == expected
        assert resumed.updates[version - 1].rehearsal == expected


# ── the announcement ─────────────────────────────────────────────────────────


def _announcement(**more: object) -> dict[str, object]:
    return {
        "schema_version": 1,
        "adapter": "tutor",
        "version": 2,
        "parent_version": 1,
        "base_model": "tiny",
        "uri": "/adapters/tutor/v2",
        "sha256": "0" * 64,
        "format": "peft",
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj"], "dropout": 0.0},
        "window": {
            "topic": "learning-events",
            "partition": 0,
            "first_offset": 0,
            "last_offset": 7,
            "size": 8,
            "event_ids": [f"e{n}" for n in range(8)],
        },
        "train_loss": 1.5,
        "created_at": "2026-01-01T00:00:00Z",
        **more,
    }


def test_an_announcement_without_rehearsal_still_decodes_and_one_with_it_round_trips() -> None:
    old = decode(orjson.dumps(_announcement()), AdapterUpdate)
    assert old.rehearsal is None
    spec = {"events": 4, "digest": "a" * 64}
    new = decode(orjson.dumps(_announcement(rehearsal=spec)), AdapterUpdate)
    assert new.rehearsal == RehearsalSpec(events=4, digest="a" * 64)
    assert decode(encode(new), AdapterUpdate) == new
    for bad in ({"events": -1, "digest": "a" * 64}, {"events": 4, "digest": "xyz"}, {"events": 4}):
        with pytest.raises(Exception, match="rehearsal"):
            decode(orjson.dumps(_announcement(rehearsal=bad)), AdapterUpdate)


def test_the_json_schema_states_the_same_rehearsal() -> None:
    from jsonschema import Draft202012Validator

    document = schema_document("AdapterUpdate")
    node = document["properties"]["rehearsal"]
    objects = [option for option in node["oneOf"] if option.get("type") == "object"]
    assert {"type": "null"} in node["oneOf"] and len(objects) == 1
    assert set(objects[0]["properties"]) == set(RehearsalSpec.model_fields)
    assert set(objects[0]["required"]) == {"events", "digest"}
    validator = Draft202012Validator(document)
    assert validator.is_valid(_announcement())
    assert validator.is_valid(_announcement(rehearsal=None))
    assert validator.is_valid(_announcement(rehearsal={"events": 0, "digest": "b" * 64}))
    assert not validator.is_valid(_announcement(rehearsal={"events": -1, "digest": "b" * 64}))


def test_the_settings_reach_the_training_config_and_bad_values_are_named() -> None:
    from lorastream.settings import load_settings
    from lorastream.stages import training_config

    config = training_config(load_settings(rehearsal=4, rehearsal_buffer=8))
    assert (config.rehearsal, config.rehearsal_buffer, config.rehearses) == (4, 8, True)
    assert not training_config(load_settings()).rehearses
    with pytest.raises(Exception, match=r"LORASTREAM_REHEARSAL \(rehearsal\)"):
        load_settings(rehearsal=-1)
    with pytest.raises(Exception, match=r"LORASTREAM_REHEARSAL_BUFFER \(rehearsal_buffer\)"):
        load_settings(rehearsal_buffer=0)
    with pytest.raises(ValueError, match=r"TrainingConfig\.rehearsal_buffer"):
        TrainingConfig(
            adapter_dir="a", base_model=Path("m"), base_model_name="m", rehearsal_buffer=0
        )
