"""Windows per adapter, and the offsets that are safe to commit."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from aiokafka import TopicPartition

from schemas import LearningEvent, SourcePosition
from trainer.lineage import Lineage
from trainer.window import Windows

TP0 = TopicPartition("learning-events", 0)
TP1 = TopicPartition("learning-events", 1)


def _event(adapter: str, n: int) -> LearningEvent:
    return LearningEvent(
        id=f"{adapter}-{n}",
        adapter=adapter,
        prompt="p",
        response="r",
        rouge_score=0.0,
        entropy_delta=0.5,
        is_breakthrough=False,
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        source=SourcePosition(topic="g", partition=0, offset=n),
    )


def _feed(windows: Windows, tp: TopicPartition, offset: int, adapter: str, n: int):
    window = windows.add(tp, offset, _event(adapter, n))
    windows.mark_read(tp, offset)
    return window


def test_a_window_closes_at_its_size_in_offset_order() -> None:
    windows = Windows(3)
    assert _feed(windows, TP0, 0, "a", 0) is None
    assert _feed(windows, TP0, 1, "a", 1) is None
    window = _feed(windows, TP0, 2, "a", 2)
    assert window is not None
    assert window.ids == ["a-0", "a-1", "a-2"]
    spec = window.spec()
    assert (spec.first_offset, spec.last_offset, spec.size) == (0, 2, 3)
    assert windows.open_windows() == []


def test_adapters_fill_their_own_windows() -> None:
    windows = Windows(2)
    closed = [_feed(windows, TP0, i, adapter, i) for i, adapter in enumerate("abab")]
    assert closed[:2] == [None, None]
    assert closed[2] is not None and closed[2].ids == ["a-0", "a-2"]
    assert closed[3] is not None and closed[3].ids == ["b-1", "b-3"]


def test_commit_never_passes_the_head_of_an_open_window() -> None:
    windows = Windows(2)
    _feed(windows, TP0, 10, "a", 0)  # a's window opens at 10
    _feed(windows, TP0, 11, "b", 0)
    b = _feed(windows, TP0, 12, "b", 1)  # b's window closes
    assert b is not None
    _feed(windows, TP1, 5, "c", 0)
    assert windows.committable(settling=[b]) == {TP0: 10, TP1: 5}
    a = _feed(windows, TP0, 13, "a", 1)  # a closes too
    assert a is not None
    assert windows.committable(settling=[a, b]) == {TP0: 14, TP1: 5}


def test_an_event_of_a_closed_window_waiting_for_its_commit_is_not_admitted_again() -> None:
    """A window closed but not yet committed (waiting to step with others') is not yet in
    its lineage: a re-delivered event of it, later in the batch, is still a duplicate (the
    soak with --adapters-per-step found such events trained twice)."""
    windows, lineage = Windows(2), Lineage("a")
    _feed(windows, TP0, 0, "a", 0)
    closed = _feed(windows, TP0, 1, "a", 1)
    assert closed is not None
    assert windows.offer(TP0, 2, _event("a", 0), lineage) == (False, None)
    assert windows.offer(TP1, 0, _event("a", 1), lineage) == (False, None)
    assert windows.offer(TP0, 3, _event("b", 0), lineage)[0]  # another adapter's id
    assert windows.offer(TP0, 4, _event("a", 2), lineage) == (True, None)
    lineage.record_window(closed.spec())  # committed, as the driver does
    windows.settle(closed)
    assert windows.offer(TP0, 5, _event("a", 0), lineage) == (False, None)


def test_commit_never_passes_a_closed_window_until_it_is_settled_or_pinned() -> None:
    """A window closed but not yet stepped (waiting for others to step with it) holds
    the commit back like an open one; the commit that carries its outcome passes it."""
    windows = Windows(2)
    _feed(windows, TP0, 10, "a", 0)
    _feed(windows, TP0, 11, "b", 0)
    a = _feed(windows, TP0, 12, "a", 1)
    b = _feed(windows, TP0, 13, "b", 1)
    assert a is not None and b is not None
    assert windows.committable() == {TP0: 10}
    assert windows.committable(settling=[a]) == {TP0: 11}
    windows.settle(a)
    assert windows.committable() == {TP0: 11}
    _feed(windows, TP0, 14, "b", 2)  # b's next window opens while b waits
    assert windows.pending() == {"b": 1}
    windows.pin(b)  # on hold: its pin keeps the bound, not its closing
    assert windows.pending() == {}  # what b took since is read again once the hold lifts
    assert windows.committable() == {TP0: 11}
    windows.keep_only(set())
    assert windows.committable() == {}


def test_skipped_records_move_the_commit_when_nothing_is_open() -> None:
    windows = Windows(16)
    windows.mark_read(TP0, 41)
    assert windows.committable() == {TP0: 42}


def test_revoked_partitions_are_forgotten() -> None:
    windows = Windows(4)
    _feed(windows, TP0, 0, "a", 0)
    _feed(windows, TP1, 0, "a", 1)
    windows.drop({TP0})
    assert windows.committable() == {TP1: 0}
    assert [w.tp for w in windows.open_windows()] == [TP1]


def test_duplicate_ids_in_an_open_window_are_detected() -> None:
    windows = Windows(4)
    _feed(windows, TP0, 0, "a", 7)
    assert windows.holds(TP0, "a", "a-7")
    assert not windows.holds(TP0, "a", "a-8")
    assert not windows.holds(TP0, "b", "a-7")


def test_max_wait_closes_partial_windows() -> None:
    windows = Windows(16)
    _feed(windows, TP0, 0, "a", 0)
    assert list(windows.expired(None)) == []
    assert list(windows.expired(3600)) == []
    (window,) = list(windows.expired(0))
    assert window.ids == ["a-0"]
    assert windows.committable() == {TP0: 0}  # closed, not yet stepped
    assert windows.committable(settling=[window]) == {TP0: 1}


def test_window_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Windows(0)


def test_a_window_records_the_trainers_size_and_the_lineage_shows_it() -> None:
    """Views show the window size the trainer recorded (#22, finding 15), also for a
    lineage whose newest window was a partial one; older announcements are inferred."""
    from schemas import AdapterUpdate
    from tests.schemas.test_models import _adapter_update
    from trainer.lineage import Lineage

    windows = Windows(8)
    (partial,) = (_feed(windows, TP0, 0, "a", 0), list(windows.expired(0)))[1]
    assert partial.spec().size == 1 and partial.spec().full_size == 8

    recorded = AdapterUpdate.model_validate(
        _adapter_update(version=1, parent_version=None, window=partial.spec().model_dump())
    )
    assert Lineage("a", updates=[recorded]).window_size == 8  # not 1, the partial window
    unrecorded = AdapterUpdate.model_validate(_adapter_update(version=1, parent_version=None))
    assert unrecorded.window.full_size is None  # an announcement from before still reads
    assert Lineage("a", updates=[unrecorded]).window_size == 2  # inferred from its windows
