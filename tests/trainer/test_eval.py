"""Every version evaluated on its adapter's held-out events, which no window trains on.

The held-out choice is a hash of the event id, so two trainers and a replay
hold out the same events; the evaluation set is part of a version's files, so
a restart continues from it; the evaluation reads the new weights and changes
nothing that training reads; with the fraction at 0 nothing differs from a
trainer without evaluation.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import orjson
import pytest
import torch
from aiokafka import TopicPartition

from lorastream.dev.events import learning_event
from lorastream.dev.topics import make_topics, produce
from schemas import LearningEvent, encode
from tests.kafka_util import wait_for
from tests.trainer.cores import cpu_core
from trainer.committed import group_offsets
from trainer.config import LoraSettings
from trainer.core import Trained, WindowTrainer
from trainer.evaluation import EvalExample, extend_eval_set
from trainer.kafka import KafkaConnection
from trainer.lineage import Lineage
from trainer.lora import LoraStepper
from trainer.model import load_base_model
from trainer.ranges import pending_events
from trainer.store import EVAL_SET_FILE, AdapterStore
from trainer.window import Windows, held_out

TP = TopicPartition("learning-events", 0)
FRACTION = 0.25
WINDOW = 4
# A higher rate than the default, so that a few steps of windows of 4 move the loss.
FAST = LoraSettings(learning_rate=1e-2)


def _events(adapter: str, count: int) -> list[LearningEvent]:
    return [learning_event(adapter, n) for n in range(count)]


def _core(model_dir: Path, adapters: Path, **more: object) -> WindowTrainer:
    return cpu_core(model_dir, adapters, WINDOW, **more)


def _drive(
    core: WindowTrainer,
    windows: Windows,
    lineage: Lineage,
    events: list[LearningEvent],
    start: int = 0,
    versions: int | None = None,
    read_on: int = 0,
) -> int:
    """The live loop without Kafka: offer events from offset ``start``, train and commit each
    closed window; stop after ``versions`` versions and ``read_on`` more events, then commit
    the offsets alone (the loop's idle commit). Returns the last offset committed: where a
    trainer killed then reads from."""
    committed = start
    for offset in range(start, len(events)):
        _, closed = windows.offer(TP, offset, events[offset], lineage)
        if closed is None:
            continue
        offsets = windows.committable(settling=[closed])  # what the driver commits with it
        outcome = core.train(closed, lineage)
        lineage.record(outcome.update if isinstance(outcome, Trained) else outcome)
        windows.settle(closed)
        committed = offsets[TP]
        if versions is not None and lineage.version >= versions:
            if not read_on:
                return committed  # killed before any later commit
            for more in range(offset + 1, offset + 1 + read_on):
                assert windows.offer(TP, more, events[more], lineage)[1] is None
            return windows.committable()[TP]
    return committed


def _eval_ids(adapters: Path, adapter: str, version: int) -> list[str]:
    data = (adapters / adapter / f"v{version}" / EVAL_SET_FILE).read_bytes()
    return [orjson.loads(line)["id"] for line in data.splitlines()]


def _digests(adapters: Path, adapter: str, version: int) -> dict[str, str]:
    directory = adapters / adapter / f"v{version}"
    return {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors")
    }


# ── the choice ───────────────────────────────────────────────────────────────


def test_the_held_out_choice_depends_on_the_event_id_alone() -> None:
    ids = [f"event-{n}" for n in range(20_000)]
    chosen = [i for i in ids if held_out(i, 0.1)]
    assert 0.09 < len(chosen) / len(ids) < 0.11
    assert chosen == [i for i in ids if held_out(i, 0.1)]  # the same in any process
    assert not any(held_out(i, 0.0) for i in ids)
    assert set(chosen) <= {i for i in ids if held_out(i, 0.2)}  # a larger share keeps these

    # Two trainers that read the adapter's events interleaved differently with another
    # adapter's hold out the same ones, whatever the lineage is called.
    events = _events("tutor", 40)
    others = _events("other", 40)
    held: list[list[list[str]]] = []
    interleaved = [e for pair in zip(others, events, strict=True) for e in pair]
    for order in (events + others, interleaved):
        windows = Windows(WINDOW, FRACTION)
        lineages = {"tutor": Lineage("renamed"), "other": Lineage("other")}
        trained: list[str] = []
        held.append([])
        for offset, event in enumerate(order):
            _, closed = windows.offer(TP, offset, event, lineages[event.adapter])
            if closed is not None and closed.adapter == "tutor":
                trained += closed.ids
                held[-1].append([p.event.id for p in closed.held_out])
                windows.settle(closed)
        assert not set(trained) & {e.id for e in events if held_out(e.id, FRACTION)}
    assert len(held[0]) == 7 and held[0] == held[1]


def test_held_out_events_never_enter_a_window_and_hold_the_offset_back_until_settled() -> None:
    events = _events("tutor", 12)
    chosen = [n for n, e in enumerate(events) if held_out(e.id, 0.1)]
    assert chosen == [0, 5], "the test's premise: tutor-000 and tutor-005 are held out"
    windows = Windows(WINDOW, 0.1)
    lineage = Lineage("tutor")
    assert windows.offer(TP, 0, events[0], lineage) == (True, None)
    assert windows.offer(TP, 0, events[0], lineage) == (False, None)  # re-delivered
    assert windows.committable() == {TP: 0}, "a pending held-out event is read again"
    closed = None
    for offset in range(1, 6):
        admitted, closed = windows.offer(TP, offset, events[offset], lineage)
        assert admitted
        if closed is not None:
            break
    assert closed is not None and closed.ids == ["tutor-001", "tutor-002", "tutor-003", "tutor-004"]
    assert [p.event.id for p in closed.held_out] == ["tutor-000"]
    assert windows.committable() == {TP: 0}, "until the window's outcome is committed"
    lineage.record_window(closed.spec())
    windows.settle(closed)
    assert windows.committable() == {TP: 5}
    assert windows.offer(TP, 5, events[5], lineage) == (True, None)
    assert windows.committable() == {TP: 5} and windows.held() == {"tutor": 1}
    windows.drop({TP})
    assert windows.committable() == {} and windows.held() == {}


def test_an_evaluation_set_keeps_the_newest_and_each_id_once() -> None:
    def example(n: int) -> EvalExample:
        return EvalExample(f"e{n}", "p", "r", "t", 0, n)

    first = extend_eval_set([], [example(n) for n in range(3)], 4)
    again = extend_eval_set(first, [example(1), example(3), example(4)], 4)
    assert [e.id for e in again] == ["e1", "e2", "e3", "e4"]


# ── each version, evaluated ──────────────────────────────────────────────────


def test_every_version_is_evaluated_on_held_out_events_and_the_eval_loss_falls(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    events = _events("tutor", 64)
    core = _core(tiny_model_dir, tmp_path, lora=FAST, eval_fraction=FRACTION, eval_size=256)
    lineage = Lineage("tutor")
    _drive(core, Windows(WINDOW, FRACTION), lineage, events)
    chosen = [e.id for e in events if held_out(e.id, FRACTION)]
    assert len(chosen) >= 8 and lineage.version >= 10

    trained = [i for u in lineage.updates for i in u.window.event_ids]
    assert not set(trained) & set(chosen), "a held-out event was trained on"
    losses = []
    for update in lineage.updates:
        ids = _eval_ids(tmp_path, "tutor", update.version)
        # The set grows by the held-out events read up to the window's last event.
        last = update.window.last_offset
        assert ids == [i for i in chosen if int(i.rsplit("-", 1)[1]) < last]
        metadata = orjson.loads((Path(update.uri) / "lorastream.json").read_bytes())
        # No timing in the file: a version trained again is the same version, bit for bit.
        assert "eval_seconds" not in metadata and EVAL_SET_FILE in metadata["files"]
        if not ids:
            assert update.eval is None and metadata["eval"] is None
            continue
        assert update.eval is not None and update.eval.events == len(ids)
        assert metadata["eval"] == update.eval.model_dump(mode="json")
        losses.append((update.eval.loss, update.eval.base_loss))
    assert losses[-1][0] < losses[0][0] - 0.3, f"the eval loss did not fall: {losses}"
    assert losses[-1][0] < losses[-1][1], "the adapter is no better than the base model"

    # The base model's losses are measured once per example and kept: the same numbers as
    # measuring the whole set again.
    last = lineage.updates[-1]
    kept = set(_eval_ids(tmp_path, "tutor", last.version))
    examples = [(e.prompt, e.response) for e in events if e.id in kept]
    fresh = core.stepper.losses(None, examples)
    base_loss = sum(s for s, _ in fresh) / sum(n for _, n in fresh)
    assert last.eval is not None and last.eval.base_loss == pytest.approx(base_loss, rel=1e-5)


def test_evaluation_changes_nothing_that_is_trained(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same files with the evaluation run, with it skipped, and with the held-out
    events never sent to a trainer without evaluation."""
    events = _events("tutor", 40)
    runs = {}
    for name in ("evaluated", "skipped", "off"):
        fraction = 0.0 if name == "off" else FRACTION
        core = _core(tiny_model_dir, tmp_path / name, eval_fraction=fraction)
        if name == "skipped":
            monkeypatch.setattr(
                core.stepper, "losses", lambda state, examples: [(1.0, 1)] * len(examples)
            )
        stream = [e for e in events if not held_out(e.id, FRACTION)] if name == "off" else events
        lineage = Lineage("tutor")
        rng = torch.get_rng_state()
        _drive(core, Windows(WINDOW, fraction), lineage, stream)
        assert torch.equal(torch.get_rng_state(), rng), "training or evaluation drew numbers"
        runs[name] = lineage
    windows = {name: [u.window.event_ids for u in lin.updates] for name, lin in runs.items()}
    assert windows["evaluated"] == windows["skipped"] == windows["off"]
    assert runs["evaluated"].updates[-1].eval is not None
    assert runs["evaluated"].updates[-1].eval.loss != 1.0
    for version in range(1, runs["off"].version + 1):
        digests = {name: _digests(tmp_path / name, "tutor", version) for name in runs}
        assert digests["evaluated"] == digests["skipped"] == digests["off"], version


def test_with_evaluation_off_the_files_and_announcements_are_those_of_before(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Fraction 0: every event trains, no evaluation file, no eval keys, ``eval`` null, and the
    weights are bit for bit those of the stepper alone (the integration tests' reference)."""
    events = _events("tutor", 12)
    core = _core(tiny_model_dir, tmp_path / "adapters", eval_fraction=0.0)
    lineage = Lineage("tutor")
    _drive(core, Windows(WINDOW, 0.0), lineage, events)
    assert [u.window.event_ids for u in lineage.updates] == [
        [e.id for e in events[k : k + WINDOW]] for k in range(0, 12, WINDOW)
    ]

    base = load_base_model(tiny_model_dir, torch.device("cpu"))
    stepper = LoraStepper(base, LoraSettings(), seed=0)
    store = AdapterStore(tmp_path / "reference")
    state = stepper.initial_state()
    for update in lineage.updates:
        assert update.eval is None
        directory = Path(update.uri)
        assert sorted(p.name for p in directory.iterdir()) == [
            "README.md",  # PEFT's
            "adapter_config.json",
            "adapter_model.safetensors",
            "lorastream.json",
            "manifest.json",
            "optimizer.safetensors",
        ]
        metadata = orjson.loads((directory / "lorastream.json").read_bytes())
        assert not [key for key in metadata if key.startswith("eval")]
        examples = [(e.prompt, e.response) for e in events if e.id in update.window.event_ids]
        state = stepper.step(state, examples).state
        reference = store.write("tutor", update.version, state, stepper, {})
        assert reference.sha256 == update.sha256
        assert _digests(tmp_path / "reference", "tutor", update.version) == _digests(
            tmp_path / "adapters", "tutor", update.version
        )


@pytest.mark.parametrize(
    ("crash_after", "read_on", "reads_from"),
    [(2, 0, 10), (2, 2, 12), (5, 3, 30)],
    ids=["held-out-in-the-last-window", "held-out-read-since", "window-open"],
)
def test_a_restart_continues_the_same_evaluation_sets(
    tiny_model_dir: Path, tmp_path: Path, crash_after: int, read_on: int, reads_from: int
) -> None:
    """A trainer killed after committing version ``crash_after`` and reading ``read_on``
    more events, restarted from the lineage and the committed offset, ends with the
    evaluation sets, measures and weights of one that never stopped."""
    events = _events("tutor", 56)

    whole = Lineage("tutor")
    _drive(
        _core(tiny_model_dir, tmp_path / "whole", eval_fraction=FRACTION),
        Windows(WINDOW, FRACTION),
        whole,
        events,
    )

    first = Lineage("tutor")
    committed = _drive(
        _core(tiny_model_dir, tmp_path / "restarted", eval_fraction=FRACTION),
        Windows(WINDOW, FRACTION),
        first,
        events,
        versions=crash_after,
        read_on=read_on,
    )
    assert committed == reads_from, "the test's premise: where the restart reads from"
    resumed = Lineage("tutor")  # as read back from adapter-updates
    for update in first.updates:
        resumed.record_update(update)
    again = _core(tiny_model_dir, tmp_path / "restarted", eval_fraction=FRACTION)
    _drive(again, Windows(WINDOW, FRACTION), resumed, events, start=committed)

    assert resumed.version == whole.version > crash_after
    for mine, theirs in zip(resumed.updates, whole.updates, strict=True):
        assert mine.window == theirs.window
        assert mine.eval == theirs.eval, mine.version
        assert _eval_ids(tmp_path / "restarted", "tutor", mine.version) == _eval_ids(
            tmp_path / "whole", "tutor", theirs.version
        )
        assert mine.sha256 == theirs.sha256


def test_an_evaluation_set_that_grows_past_its_size_keeps_the_newest(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    events = _events("tutor", 40)
    core = _core(tiny_model_dir, tmp_path, eval_fraction=FRACTION, eval_size=3)
    lineage = Lineage("tutor")
    _drive(core, Windows(WINDOW, FRACTION), lineage, events)
    chosen = [e.id for e in events if held_out(e.id, FRACTION)]
    last = lineage.updates[-1]
    expected = [i for i in chosen if int(i.rsplit("-", 1)[1]) < last.window.last_offset][-3:]
    assert _eval_ids(tmp_path, "tutor", last.version) == expected
    assert last.eval is not None and last.eval.events == 3


# ── on the broker: the live trainer and a replay hold out the same events ─────


@pytest.mark.integration
@pytest.mark.timeout(300)
async def test_the_live_trainer_and_a_replay_hold_out_and_evaluate_the_same_events(
    kafka_bootstrap: str, tmp_path: Path, prefix: str
) -> None:
    from lorastream.settings import load_settings
    from lorastream.stages import replay_config, replay_decoder, trainer_config
    from trainer import Replay, Trainer

    topics = await make_topics(kafka_bootstrap, prefix)
    events = _events("solo", 30)
    await produce(kafka_bootstrap, topics.learning_events, [(b"solo", encode(e)) for e in events])
    settings = load_settings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=prefix,
        adapter_dir=tmp_path / "adapters",
        home=tmp_path / "home",
        window_size=WINDOW,
        eval_fraction=FRACTION,
    )
    chosen = [e.id for e in events if held_out(e.id, FRACTION)]

    trainer = Trainer(trainer_config(settings))
    expected = (len(events) - len(chosen)) // WINDOW
    async with trainer:
        running = asyncio.create_task(trainer.run())

        async def done() -> bool:
            lineage = trainer.lineages.get("solo")
            return lineage is not None and lineage.version >= expected

        await wait_for(done, 180, f"the live trainer's v{expected}")
        trainer.request_stop()
        await running
    live = trainer.lineages["solo"].updates

    # What `adapters list` and `status` say waits for a window: the trained events past the
    # last version, not the held-out ones read since (which never train).
    since = await group_offsets(
        KafkaConnection(kafka_bootstrap), settings.trainer_group_id, topics.learning_events
    )
    unread = events[since[TopicPartition(topics.learning_events, 0)] :]  # one partition
    assert any(held_out(e.id, FRACTION) for e in unread), "the test needs one held out there"
    pending = await pending_events(
        KafkaConnection(kafka_bootstrap),
        topics.learning_events,
        settings.trainer_group_id,
        dict(trainer.lineages),
        eval_fraction=FRACTION,
    )
    assert pending == {"solo": (len(events) - len(chosen)) % WINDOW}

    config = replay_config(settings, source="solo", target="solo-replayed")
    replay = Replay(config, replay_decoder(settings, "solo", rescore=False))
    plan = (await replay.plan()).adapters["solo"]  # what `replay --dry-run` prints
    assert (plan.events, plan.held_out, plan.windows) == (
        len(events) - len(chosen),
        len(chosen),
        expected,
    )
    core = await asyncio.to_thread(WindowTrainer.load, config.training)
    async with replay.session() as session:
        report = await replay.run(core, session)
    replayed = [t.update for t in report.trained]

    adapters = tmp_path / "adapters"
    assert len(replayed) == len(live) == expected
    assert report.held_out == len(chosen)
    for mine, theirs in zip(replayed, live, strict=True):
        assert mine.window.event_ids == theirs.window.event_ids
        assert not set(mine.window.event_ids) & set(chosen)
        assert _eval_ids(adapters, "solo-replayed", mine.version) == _eval_ids(
            adapters, "solo", theirs.version
        )
        assert mine.eval == theirs.eval and mine.sha256 == theirs.sha256
    assert live[-1].eval is not None
    assert set(_eval_ids(adapters, "solo", live[-1].version)) <= set(chosen)


def test_trained_outcomes_carry_their_evaluation_set(tiny_model_dir: Path, tmp_path: Path) -> None:
    events = _events("tutor", 8)
    core = _core(tiny_model_dir, tmp_path, eval_fraction=FRACTION)
    windows = Windows(WINDOW, FRACTION)
    lineage = Lineage("tutor")
    closed = None
    for offset, event in enumerate(events):
        _, closed = windows.offer(TP, offset, event, lineage)
        if closed is not None:
            break
    assert closed is not None
    outcome = core.train(closed, lineage)
    assert isinstance(outcome, Trained)
    assert [e.id for e in outcome.eval_set] == ["tutor-000", "tutor-003", "tutor-005"]
    assert outcome.eval_seconds is not None and outcome.eval_seconds > 0
