"""The duplicates a trainer skips are reported, one line per partition and batch (#22,
finding 18): a re-produce used to leave no trace in the log. That the trainer writes them is
checked on a real process in test_instances.py."""

from __future__ import annotations

from aiokafka import TopicPartition

from lorastream.dev.events import learning_event
from trainer.lineage import Lineage
from trainer.window import Windows

TP = TopicPartition("learning-events", 0)


def test_windows_report_the_duplicates_they_refuse_once_per_partition() -> None:
    windows = Windows(4)
    lineages = {"alpha": Lineage("alpha"), "beta": Lineage("beta")}
    offset = 0
    for adapter in ("alpha", "beta"):
        for n in range(3):
            windows.offer(TP, offset, learning_event(adapter, n), lineages[adapter])
            offset += 1
    assert windows.take_skipped() == []
    for n in (0, 1, 2, 0, 1, 2, 0):  # the first three again, twice, and one more
        admitted, _ = windows.offer(TP, offset, learning_event("alpha", n), lineages["alpha"])
        assert not admitted
        offset += 1
    [report] = windows.take_skipped()
    assert (report.count, report.first_offset, report.last_offset) == (7, 6, 12)
    assert str(report) == (
        "learning-events[0]@6..12, ids alpha-000, alpha-001, alpha-002, "
        "alpha-000, alpha-001 and 2 more"
    )
    assert windows.take_skipped() == []  # reported once


def test_an_adapter_on_hold_is_not_reported_as_duplicates() -> None:
    windows = Windows(2)
    lineage = Lineage("alpha")
    windows.offer(TP, 0, learning_event("alpha", 0), lineage)
    _, closed = windows.offer(TP, 1, learning_event("alpha", 1), lineage)
    assert closed is not None
    windows.pin(closed)
    admitted, _ = windows.offer(TP, 2, learning_event("alpha", 2), lineage)
    assert not admitted
    assert windows.take_skipped() == []
