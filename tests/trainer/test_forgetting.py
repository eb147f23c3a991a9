"""The forgetting matrix: held-out events in segments, every version measured per segment.

A held-out event's segment is its ``metadata.segment`` label, or else the range of
versions whose window brought it; trimming the set keeps every segment; each version's
``eval.segments`` is what the stepper computes directly on each segment's events; the
matrix R, ACC and BWT read from a lineage are the hand-computed numbers; old files and
announcements without segments still decode.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from aiokafka import TopicPartition

from lorastream.dev.events import learning_event
from schemas import (
    AdapterUpdate,
    EvalSpec,
    LearningEvent,
    LoraSpec,
    SegmentEval,
    WindowSpec,
    decode,
    encode,
)
from trainer.config import LoraSettings, TrainingConfig
from trainer.core import Trained, WindowTrainer
from trainer.evaluation import (
    UNLABELLED,
    EvalExample,
    decode_eval_set,
    extend_eval_set,
    segment_of,
    trained_segment,
    version_range,
)
from trainer.forgetting import forgetting
from trainer.lineage import Lineage
from trainer.store import EVAL_SET_FILE
from trainer.window import Windows, held_out

TP = TopicPartition("learning-events", 0)
FRACTION = 0.25
WINDOW = 4


def _labelled(n: int, label: object) -> LearningEvent:
    event = learning_event("tutor", n)
    return event.model_copy(update={"metadata": {"segment": label}})


# ── segments ─────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("label", "version", "windows", "segment"),
    [
        pytest.param("task-A", 1, 8, "task-A", id="a-label-names-the-segment"),
        pytest.param("task-A", 30, 8, "task-A", id="a-label-whatever-the-version"),
        pytest.param(None, 1, 8, "v1-v8", id="no-label-version-1"),
        pytest.param(None, 8, 8, "v1-v8", id="no-label-version-8"),
        pytest.param(None, 9, 8, "v9-v16", id="no-label-version-9"),
        pytest.param(None, 5, 2, "v5-v6", id="windows-of-2"),
        pytest.param("", 3, 1, "v3-v3", id="an-empty-label-is-none"),
        pytest.param("x" * 65, 3, 4, "v1-v4", id="a-label-too-long-is-none"),
        pytest.param(7, 3, 4, "v1-v4", id="a-label-not-a-string-is-none"),
    ],
)
def test_the_segment_of_an_event(label: object, version: int, windows: int, segment: str) -> None:
    event = learning_event("tutor", 0) if label is None else _labelled(0, label)
    assert segment_of(event, version, windows) == segment


def test_a_version_trains_in_its_events_most_common_segment() -> None:
    events = [_labelled(0, "B"), _labelled(1, "A"), _labelled(2, "A"), learning_event("t", 3)]
    assert trained_segment(events, 3, 8) == "A"
    assert trained_segment([_labelled(0, "B"), _labelled(1, "A")], 3, 8) == "B"  # a tie: first
    assert trained_segment([learning_event("t", 0)], 12, 4) == version_range(12, 4) == "v9-v12"


def _example(n: int, segment: str) -> EvalExample:
    return EvalExample(f"e{n}", "p", "r", "t", 0, n, segment=segment)


def test_trimming_keeps_every_segment_dropping_the_oldest_of_the_largest() -> None:
    """The newest ``size`` alone (the rule before segments) would keep only B and C here:
    the first segment, the one forgetting is measured on, would vanish."""
    examples = [_example(n, "A") for n in range(5)] + [_example(5, "B"), _example(6, "B")]
    kept = extend_eval_set(examples, [_example(7, "C")], 3)
    assert [(e.id, e.segment) for e in kept] == [("e4", "A"), ("e6", "B"), ("e7", "C")]

    # Ties go to the segment that appears first; the order of the set is kept.
    tied = [_example(0, "A"), _example(1, "B"), _example(2, "A"), _example(3, "B")]
    assert [e.id for e in extend_eval_set(tied, [], 3)] == ["e1", "e2", "e3"]
    # One segment: the newest, as before.
    one = [_example(n, "v1-v8") for n in range(6)]
    assert [e.id for e in extend_eval_set(one, [], 4)] == ["e2", "e3", "e4", "e5"]
    # The same input, the same set: nothing but the examples decides.
    assert extend_eval_set(examples, [_example(7, "C")], 3) == kept


def test_an_evaluation_set_written_before_segments_decodes_unlabelled() -> None:
    old = b'{"id":"e1","prompt":"p","response":"r","topic":"t","partition":0,"offset":3,'
    old += b'"base_loss_sum":2.5,"tokens":4}\n'
    (example,) = decode_eval_set(old, "eval-set.jsonl")
    assert example.segment == UNLABELLED and example.base_loss_sum == 2.5


# ── each version measured per segment ────────────────────────────────────────


def _events() -> list[LearningEvent]:
    """Task A's labelled events, then unlabelled ones (segments by version range)."""
    labelled = [_labelled(n, "task-A") for n in range(24)]
    return labelled + [learning_event("tutor", n) for n in range(24, 56)]


def _drive(core: WindowTrainer, events: list[LearningEvent]) -> Lineage:
    lineage = Lineage("tutor")
    windows = Windows(WINDOW, FRACTION)
    for offset, event in enumerate(events):
        _, closed = windows.offer(TP, offset, event, lineage)
        if closed is None:
            continue
        outcome = core.train(closed, lineage)
        assert isinstance(outcome, Trained)
        lineage.record(outcome.update)
        windows.settle(closed)
    return lineage


def test_each_versions_segments_are_the_stepper_s_losses_on_each_segment_s_events(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = TrainingConfig(
        adapter_dir=tmp_path,
        base_model=tiny_model_dir,
        base_model_name="tiny",
        window_size=WINDOW,
        device="cpu",
        lora=LoraSettings(learning_rate=1e-2),
        eval_fraction=FRACTION,
        eval_segment_windows=3,
    )
    core = WindowTrainer.load(config)
    events = _events()
    lineage = _drive(core, events)
    held = {e.id for e in events if held_out(e.id, FRACTION)}
    assert len(held) >= 8 and lineage.version >= 8

    seen_segments: set[str] = set()
    for update in lineage.updates[-3:]:
        assert update.eval is not None and update.eval.segments is not None
        examples = decode_eval_set((Path(update.uri) / EVAL_SET_FILE).read_bytes(), EVAL_SET_FILE)
        # Labelled events are in their label's segment; the others in their version range.
        for example in examples:
            number = int(example.id.rsplit("-", 1)[1])
            if number < 24:
                assert example.segment == "task-A"
            else:
                assert example.segment.startswith("v") and example.segment != "task-A"
        state = core.store.read(update.adapter, update.version, update.sha256)
        order = list(dict.fromkeys(e.segment for e in examples))
        assert [s.segment for s in update.eval.segments] == order
        for measured in update.eval.segments:
            pairs = [(e.prompt, e.response) for e in examples if e.segment == measured.segment]
            mine = core.stepper.losses(state, pairs)
            base = core.stepper.losses(None, pairs)
            tokens = sum(count for _, count in mine)
            assert measured.events == len(pairs)
            assert measured.loss == pytest.approx(sum(t for t, _ in mine) / tokens, abs=1e-6)
            assert measured.base_loss == pytest.approx(sum(t for t, _ in base) / tokens, abs=1e-6)
            seen_segments.add(measured.segment)
        # The whole set's loss is the segments' token-weighted mean, as before.
        assert sum(s.events for s in update.eval.segments) == update.eval.events
    assert "task-A" in seen_segments and len(seen_segments) >= 3, seen_segments
    metadata = orjson.loads((Path(lineage.updates[-1].uri) / "lorastream.json").read_bytes())
    assert metadata["eval"]["segments"] == [
        s.model_dump(mode="json")
        for s in lineage.updates[-1].eval.segments  # type: ignore[union-attr]
    ]
    # Each version names the segment it trained in: the label while its window's events
    # carry it, the version range after.
    assert lineage.updates[0].eval is None or lineage.updates[0].eval.segment == "task-A"
    last = lineage.updates[-1]
    assert last.eval is not None and last.eval.segment == version_range(last.version, 3)


# ── the matrix ───────────────────────────────────────────────────────────────


def _update(version: int, trained: str, losses: dict[str, float]) -> AdapterUpdate:
    return AdapterUpdate(
        adapter="tutor",
        version=version,
        parent_version=version - 1 or None,
        base_model="/models/base",
        uri=f"/nowhere/tutor/v{version}",
        sha256="0" * 64,
        lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj"]),
        window=WindowSpec(
            topic="learning-events",
            partition=0,
            first_offset=version,
            last_offset=version,
            size=1,
            event_ids=[f"e{version}"],
        ),
        train_loss=2.0,
        created_at=datetime(2026, 11, 27, tzinfo=UTC),
        eval=EvalSpec(
            loss=sum(losses.values()) / len(losses),
            base_loss=6.0,
            events=len(losses),
            segment=trained,
            segments=[
                SegmentEval(segment=s, loss=loss, base_loss=6.0, events=1)
                for s, loss in losses.items()
            ],
        ),
    )


LINEAGE = [
    _update(1, "A", {"A": 3.0}),
    _update(2, "A", {"A": 2.0}),  # the last version trained in A: R[A]
    _update(3, "B", {"A": 2.2, "B": 4.0}),
    _update(4, "B", {"A": 2.4, "B": 1.0}),  # R[B]
    _update(5, "C", {"A": 2.6, "B": 1.5, "C": 0.5}),  # R[C], the last row
]


def test_r_acc_and_bwt_from_a_made_up_lineage_are_the_hand_computed_numbers() -> None:
    matrix = forgetting("tutor", LINEAGE)
    assert matrix.segments == ["A", "B", "C"]
    assert matrix.versions == [2, 4, 5]
    assert matrix.matrix == [[2.0, None, None], [2.4, 1.0, None], [2.6, 1.5, 0.5]]
    assert matrix.acc == pytest.approx((2.6 + 1.5 + 0.5) / 3)
    # Mean over A and B of R[j][j] - R[C][j]: ((2.0 - 2.6) + (1.0 - 1.5)) / 2 = -0.55.
    assert matrix.bwt == pytest.approx(-0.55)
    assert matrix.bwt_percent == pytest.approx(100 * -0.55 / 1.5)
    assert matrix.base == [6.0, 6.0, 6.0]


def test_the_matrix_rows_follow_the_last_version_trained_in_each_segment() -> None:
    """A stream that returns to A: A's row is its newest version, and the last row."""
    back = [*LINEAGE, _update(6, "A", {"A": 1.8, "B": 1.6, "C": 0.9})]
    matrix = forgetting("tutor", back)
    assert matrix.segments == ["B", "C", "A"] and matrix.versions == [4, 5, 6]
    assert matrix.matrix[-1] == [1.6, 0.9, 1.8]
    assert matrix.bwt == pytest.approx(((1.0 - 1.6) + (0.5 - 0.9)) / 2)


def test_versions_without_segments_are_left_out_and_one_segment_has_no_bwt() -> None:
    old = LINEAGE[0].model_copy(update={"eval": EvalSpec(loss=3.0, base_loss=6.0, events=1)})
    matrix = forgetting("tutor", [old, LINEAGE[1]])
    assert matrix.segments == ["A"] and matrix.versions == [2]
    assert matrix.acc == 2.0 and matrix.bwt is None and matrix.bwt_percent is None
    assert forgetting("tutor", [old]).segments == []
    text = "\n".join(forgetting("tutor", LINEAGE).lines())
    assert "ACC 1.5333" in text and "BWT -0.5500 (-36.67% of the diagonal's mean)" in text


def test_an_adapter_update_announced_before_segments_and_general_eval_still_decodes() -> None:
    """The JSON of an announcement from before these fields: no segments, no segment, no
    general_eval."""
    document = orjson.loads(encode(LINEAGE[0]))
    del document["eval"]["segments"], document["eval"]["segment"], document["general_eval"]
    for key in ("rehearsal",):
        document.pop(key, None)
    old = decode(orjson.dumps(document), AdapterUpdate)
    assert old.eval is not None and old.eval.segments is None and old.eval.segment is None
    assert old.general_eval is None
    assert forgetting("tutor", [old]).segments == []


def test_the_json_schema_file_states_the_new_fields_as_the_types_do() -> None:
    from schemas import GeneralEvalSpec, schema_document

    properties = schema_document("AdapterUpdate")["properties"]
    general = next(o for o in properties["general_eval"]["oneOf"] if o.get("type") == "object")
    assert set(general["properties"]) == set(GeneralEvalSpec.model_fields)
    assert set(general["required"]) == set(GeneralEvalSpec.model_fields)
    evaluation = next(o for o in properties["eval"]["oneOf"] if o.get("type") == "object")
    items = evaluation["properties"]["segments"]["items"]
    assert set(items["properties"]) == set(items["required"]) == set(SegmentEval.model_fields)
    assert {"segment", "segments"} <= set(evaluation["properties"])
