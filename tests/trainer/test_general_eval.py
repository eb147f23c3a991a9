"""General drift: every version measured on a general set (LORASTREAM_GENERAL_EVAL) beside
the base model.

The numbers are the stepper's own on the set; the base model is measured once per
process; measuring changes no weight and no file but the version's lorastream.json (and
the manifest that covers it); it works with the held-out evaluation off; a missing or bad
file is one line naming the variable (and the line).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from lorastream.dev.events import learning_event
from lorastream.dev.topics import make_topics
from lorastream.settings import SettingsError, load_settings
from lorastream.stages import training_config
from schemas import AdapterUpdate, GeneralEvalSpec
from trainer.config import LoraSettings, TrainingConfig
from trainer.core import Trained, WindowTrainer
from trainer.general import GeneralSet, read_general_set
from trainer.lineage import Lineage
from trainer.store import EVAL_SET_FILE
from trainer.window import Windows

TP = TopicPartition("learning-events", 0)
WINDOW = 4
GENERAL = [
    {"prompt": "The quick brown fox", "response": " jumps over the lazy dog."},
    {"prompt": "Water boils at", "response": " one hundred degrees Celsius.", "id": "g2"},
    {"prompt": "Once upon a time", "response": " there was a small village."},
]


def _general_file(tmp_path: Path) -> Path:
    path = tmp_path / "general.jsonl"
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in GENERAL))
    return path


def _train(
    model: Path, adapters: Path, general: GeneralSet | None, fraction: float, events: int = 24
) -> tuple[WindowTrainer, list[AdapterUpdate]]:
    config = TrainingConfig(
        adapter_dir=adapters,
        base_model=model,
        base_model_name="tiny",
        window_size=WINDOW,
        device="cpu",
        lora=LoraSettings(learning_rate=1e-2),
        eval_fraction=fraction,
        general_eval=general,
    )
    core = WindowTrainer.load(config)
    lineage = Lineage("tutor")
    windows = Windows(WINDOW, fraction)
    for offset in range(events):
        _, closed = windows.offer(TP, offset, learning_event("tutor", offset), lineage)
        if closed is not None:
            outcome = core.train(closed, lineage)
            assert isinstance(outcome, Trained)
            lineage.record(outcome.update)
            windows.settle(closed)
    return core, lineage.updates


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_the_general_set_is_read_with_its_sha256(tmp_path: Path) -> None:
    path = _general_file(tmp_path)
    general = read_general_set(path)
    assert general.examples == tuple((g["prompt"], g["response"]) for g in GENERAL)
    assert general.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_general_eval_is_the_stepper_s_loss_and_changes_no_weight_and_no_other_file(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    general = read_general_set(_general_file(tmp_path))
    core, measured = _train(tiny_model_dir, tmp_path / "with", general, 0.25)
    _, plain = _train(tiny_model_dir, tmp_path / "without", None, 0.25)
    assert len(measured) == len(plain) >= 4

    base = core.stepper.losses(None, general.examples)
    for update, other in zip(measured, plain, strict=True):
        spec = update.general_eval
        assert isinstance(spec, GeneralEvalSpec) and other.general_eval is None
        state = core.store.read("tutor", update.version, update.sha256)
        sums = core.stepper.losses(state, general.examples)
        tokens = sum(count for _, count in sums)
        assert spec.loss == pytest.approx(sum(t for t, _ in sums) / tokens, abs=1e-6)
        assert spec.base_loss == pytest.approx(sum(t for t, _ in base) / tokens, abs=1e-6)
        assert spec.events == len(GENERAL) and spec.sha256 == general.sha256

        # The same weights, eval and files: only lorastream.json gains general_eval (and
        # manifest.json, which lists every file's sha256, follows it).
        assert update.sha256 == other.sha256 and update.eval == other.eval
        mine, theirs = _files(Path(update.uri)), _files(Path(other.uri))
        assert mine.keys() == theirs.keys() and EVAL_SET_FILE in mine
        differ = {name for name in mine if mine[name] != theirs[name]}
        assert differ == {"lorastream.json", "manifest.json"}
        with_general = orjson.loads(mine["lorastream.json"])
        assert with_general.pop("general_eval") == spec.model_dump(mode="json")
        assert with_general == orjson.loads(theirs["lorastream.json"])
    # The adapter learnt its task: its general-set loss moved away from the base's.
    last = measured[-1].general_eval
    assert last is not None and last.loss != last.base_loss

    # The base model is measured on the general set once per process, not per version.
    calls: list[Any] = []
    original = core.stepper.losses

    def counting(state: Any, examples: Any) -> Any:
        if state is None and list(examples) == list(general.examples):
            calls.append(state)
        return original(state, examples)

    monkeypatch.setattr(core.stepper, "losses", counting)
    assert core.measure._general(core.stepper.initial_state(), "tutor", 99) is not None
    assert calls == []


def test_general_eval_works_with_the_held_out_evaluation_off(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    general = read_general_set(_general_file(tmp_path))
    _, updates = _train(tiny_model_dir, tmp_path / "adapters", general, 0.0, events=8)
    for update in updates:
        assert update.eval is None and update.general_eval is not None
        assert not (Path(update.uri) / EVAL_SET_FILE).exists()
        metadata = orjson.loads((Path(update.uri) / "lorastream.json").read_bytes())
        assert "eval" not in metadata and metadata["general_eval"] is not None


# ── a missing or bad file: one line naming the variable ──────────────────────


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(None, "general.jsonl: no such file", id="missing"),
        pytest.param(b"", "general.jsonl: holds no examples", id="empty"),
        pytest.param(b'{"prompt": "a", "response": "b"}\nnot json\n', ":2: not JSON", id="json"),
        pytest.param(b'\n\n["a", "b"]\n', ":3: not a JSON object", id="not-an-object"),
        pytest.param(b'{"prompt": "a"}\n', ':1: "response" must be a string', id="no-response"),
        pytest.param(b'{"prompt": 1, "response": "b"}\n', ':1: "prompt" must be', id="number"),
        pytest.param(b'{"prompt": "a", "response": ""}\n', ':1: "response" is empty', id="blank"),
    ],
)
def test_a_missing_or_bad_general_set_is_one_line_naming_the_variable(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "general.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SettingsError) as caught:
        training_config(load_settings(general_eval=str(path)))
    message = str(caught.value)
    assert message.startswith(f"LORASTREAM_GENERAL_EVAL: {path}")
    assert problem in message and "\n" not in message, message


def test_an_empty_general_eval_path_is_refused_by_the_settings() -> None:
    with pytest.raises(SettingsError, match="LORASTREAM_GENERAL_EVAL"):
        load_settings(general_eval=" ")


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_train_with_a_bad_general_set_exits_with_one_line(
    kafka_bootstrap: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command as run: its topics exist, so the bad file is what stops it."""
    from lorastream.cli import main

    asyncio.run(make_topics(kafka_bootstrap, prefix))
    bad = tmp_path / "general.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "respnse": "b"}\n')
    for name, value in {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "LORASTREAM_TOPIC_PREFIX": prefix,
        "LORASTREAM_GENERAL_EVAL": str(bad),
        "LORASTREAM_HOME": str(tmp_path / "home"),
    }.items():
        monkeypatch.setenv(name, value)
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            main(["train"])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert exit_.value.code == 1
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert lines == [
        f'SettingsError: LORASTREAM_GENERAL_EVAL: {bad}:2: "response" must be a string'
    ], err.getvalue()
