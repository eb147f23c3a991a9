"""Many adapters' windows in one step, through the core (#24): each window its own version
and files with the group recorded, a failure or a hold its window's alone, and a replay
that steps a window with stand-ins of the recorded group bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest
import torch
from aiokafka import TopicPartition

from lorastream.dev.events import learning_event
from schemas import QuarantineRecord, StepGroup
from tests.trainer.cores import cpu_core
from trainer.adapter_state import AdapterState
from trainer.core import Outcome, Trained, WindowTrainer
from trainer.exceptions import AdapterHeld
from trainer.lineage import Lineage
from trainer.store import ADAPTER_FILE, METADATA_FILE, OPTIMIZER_FILE
from trainer.window import Window, Windows

TP = TopicPartition("learning-events", 0)
SIZE = 4


def _windows(adapter: str, count: int) -> list[Window]:
    """``count`` windows of ``adapter``, its own texts (of its own lengths) in each."""
    windows, lineage, closed = Windows(SIZE), Lineage(adapter), []
    for n in range(count * SIZE):
        pair = (f"{adapter} asks {n}: " + "why " * (n % 3 + len(adapter)), f"{adapter} {n}")
        event = learning_event(adapter, n, pair=pair)
        _, window = windows.offer(TP, n, event, lineage)
        if window is not None:
            closed.append(window)
            windows.settle(window)
    return closed


def _core(model_dir: Path, adapters: Path, **more: object) -> WindowTrainer:
    return cpu_core(model_dir, adapters, SIZE, **more)


def _trained(outcome: Outcome | AdapterHeld) -> Trained:
    assert isinstance(outcome, Trained), outcome
    return outcome


def _within(a: AdapterState, b: AdapterState, tolerance: float = 1e-6) -> None:
    for key in b.weights:
        assert float((a.weights[key] - b.weights[key]).abs().max()) <= tolerance, key


NAMES = ("ada", "bo", "cyrus")


def test_a_group_makes_each_window_its_own_version_and_records_the_group(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    core = _core(tiny_model_dir, tmp_path / "grouped", adapters_per_step=3)
    alone = _core(tiny_model_dir, tmp_path / "alone")
    windows = {name: _windows(name, 2) for name in NAMES}
    lineages = {name: Lineage(name) for name in NAMES}
    singles = {name: Lineage(name) for name in NAMES}
    for n in range(2):
        outcomes = core.train_group([(windows[a][n], lineages[a]) for a in NAMES])
        for name, outcome in zip(NAMES, outcomes, strict=True):
            trained = _trained(outcome)
            update = trained.update
            assert (update.adapter, update.version) == (name, n + 1)
            group = update.window.group
            assert group is not None and group.adapters == list(NAMES)
            assert [len(rows) for rows in group.rows] == [SIZE] * 3
            assert update.window.event_ids == windows[name][n].ids
            written = tmp_path / "grouped" / name / f"v{n + 1}" / METADATA_FILE
            assert orjson.loads(written.read_bytes())["window"]["group"]["adapters"] == list(NAMES)
            lineages[name].record(update)
            single = _trained(alone.train(windows[name][n], singles[name]))
            singles[name].record(single.update)
            assert single.update.window.group is None
            # The step it would have taken alone, within fp32 rounding (not bit for bit).
            _within(trained.state, single.state)
            assert trained.update.train_loss == pytest.approx(single.update.train_loss, rel=1e-6)
    # The rows are each adapter's own: its texts differ in length from the others'.
    assert len({str(rows) for rows in group.rows}) == 3


def test_more_adapters_than_a_step_takes_go_in_groups_of_that_many(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    core = _core(tiny_model_dir, tmp_path, adapters_per_step=2)
    items = [(_windows(name, 1)[0], Lineage(name)) for name in NAMES]
    groups = [_trained(o).update.window.group for o in core.train_group(items)]
    assert groups[0] is not None and groups[0].adapters == ["ada", "bo"]
    assert groups[1] == groups[0]
    assert groups[2] is None  # the third steps alone
    with pytest.raises(ValueError, match="each adapter's window once"):
        core.train_group([items[0], (_windows("ada", 2)[1], items[0][1])])


def test_a_window_that_fails_inside_a_group_is_quarantined_alone(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Its NaNs never reach the others: they are trained (their group recorded, the failed
    adapter in it, as it was in the batch) as they would have been without the failure;
    the failed window is tried again alone, then quarantined."""
    windows = {name: _windows(name, 1)[0] for name in NAMES}
    poisoned = windows["bo"].ids[1]
    core = _core(
        tiny_model_dir, tmp_path / "g", adapters_per_step=3, faults=f"nan:{poisoned}", max_tries=2
    )
    clean = _core(tiny_model_dir, tmp_path / "clean", adapters_per_step=3)
    outcomes = core.train_group([(windows[a], Lineage(a)) for a in NAMES])
    reference = clean.train_group([(windows[a], Lineage(a)) for a in NAMES])
    failed = outcomes[1]
    assert isinstance(failed, QuarantineRecord)
    assert failed.adapter == "bo" and failed.tries == 2
    assert "try 1: NonFiniteLossError" in failed.error and "try 2" in failed.error
    assert not (tmp_path / "g" / "bo" / "v1").exists()
    for i in (0, 2):
        trained = _trained(outcomes[i])
        assert trained.update.window.group is not None
        assert trained.update.window.group.adapters == list(NAMES)
        assert trained.update.sha256 == _trained(reference[i]).update.sha256


def test_an_adapter_put_on_hold_is_held_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = _core(tiny_model_dir, tmp_path, adapters_per_step=3)
    lineages = {name: Lineage(name) for name in NAMES}
    windows = {name: _windows(name, 2) for name in NAMES}
    for name, outcome in zip(
        NAMES, first.train_group([(windows[a][0], lineages[a]) for a in NAMES]), strict=True
    ):
        lineages[name].record(_trained(outcome).update)
    shutil.rmtree(tmp_path / "bo" / "v1")  # its parent's files are gone
    again = _core(tiny_model_dir, tmp_path, adapters_per_step=3)  # reads every parent afresh
    outcomes = again.train_group([(windows[a][1], lineages[a]) for a in NAMES])
    assert isinstance(outcomes[1], AdapterHeld) and outcomes[1].adapter == "bo"
    for i in (0, 2):
        group = _trained(outcomes[i]).update.window.group
        assert group is not None and group.adapters == ["ada", "cyrus"]


def test_a_replay_with_the_recorded_group_writes_the_same_files(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """What ``lorastream replay`` does for a window trained in a group: the same batch's
    shape with stand-ins for the others, in another process's model, gives the same bytes;
    stepped alone, the files differ (so the comparison can tell)."""
    live = _core(tiny_model_dir, tmp_path / "live", adapters_per_step=3)
    windows = {name: _windows(name, 2) for name in NAMES}
    lineages = {name: Lineage(name) for name in NAMES}
    for n in range(2):
        for name, outcome in zip(
            NAMES, live.train_group([(windows[a][n], lineages[a]) for a in NAMES]), strict=True
        ):
            lineages[name].record(_trained(outcome).update)
    replay = _core(tiny_model_dir, tmp_path / "replay")
    alone = _core(tiny_model_dir, tmp_path / "alone")
    target, apart = Lineage("bo-again"), Lineage("bo-alone")
    differs = []
    for n, update in enumerate(lineages["bo"].updates):
        assert update.window.group is not None
        group = update.window.group.named("bo", "bo-again")
        again = _trained(replay.train(windows["bo"][n], target, group))
        target.record(again.update)
        assert again.update.window.group == group
        assert again.update.sha256 == update.sha256
        for file in (ADAPTER_FILE, OPTIMIZER_FILE):
            live_file = tmp_path / "live" / "bo" / f"v{n + 1}" / file
            replay_file = tmp_path / "replay" / "bo-again" / f"v{n + 1}" / file
            assert replay_file.read_bytes() == live_file.read_bytes(), (n, file)
        single = _trained(alone.train(windows["bo"][n], apart))
        apart.record(single.update)
        apart_file = tmp_path / "alone" / "bo-alone" / f"v{n + 1}" / OPTIMIZER_FILE
        differs.append(apart_file.read_bytes() != replay_file.read_bytes())
    assert any(differs), "stepped alone, the window gives other moments"


def test_a_group_whose_rows_are_not_the_windows_is_stepped_alone(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A replay under another max_length (so other rows) cannot rebuild the batch: it steps
    the window alone, and says so by recording no group."""
    (window,) = _windows("bo", 1)
    group = StepGroup(adapters=["bo", "x"], rows=[[(1, 1)] * SIZE, [(3, 2)]])
    trained = _trained(_core(tiny_model_dir, tmp_path).train(window, Lineage("bo"), group))
    assert trained.update.window.group is None
    assert torch.isfinite(torch.tensor(trained.update.train_loss))


def test_a_window_written_before_a_crash_is_stepped_again_as_it_was(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A trainer killed between a group's files and its commit leaves their versions on
    disk. The next trainer may group those windows otherwise (or not at all): each is
    stepped again in the group its files record, and writes the same files, instead of
    putting its adapter on hold for a version "that exists with other content" (the soak
    with --adapters-per-step found three adapters held so)."""
    windows = {name: _windows(name, 1)[0] for name in NAMES}
    first = _core(tiny_model_dir, tmp_path, adapters_per_step=3)
    written = {
        name: _trained(o).update
        for name, o in zip(
            NAMES, first.train_group([(windows[a], Lineage(a)) for a in NAMES]), strict=True
        )
    }  # and the process dies: nothing is committed, nothing recorded
    again = _core(tiny_model_dir, tmp_path, adapters_per_step=2)
    outcomes = again.train_group([(windows[a], Lineage(a)) for a in ("bo", "cyrus")])
    alone = _core(tiny_model_dir, tmp_path).train(windows["ada"], Lineage("ada"))
    for name, outcome in zip(("bo", "cyrus", "ada"), [*outcomes, alone], strict=True):
        update = _trained(outcome).update
        assert update.sha256 == written[name].sha256, name
        assert update.manifest_sha256 == written[name].manifest_sha256, name
        assert update.window.group == written[name].window.group, name
