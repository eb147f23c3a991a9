"""The drift benchmark's arithmetic and data (bench/bench_forgetting.py, issue #23).

The figures it reports rest on these: R, ACC and BWT as GEM defines them (with
performance = -loss), and a stream that goes through the tasks in order, in whole
windows, never showing a held-out pair.
"""

from __future__ import annotations

import pytest

from bench.bench_forgetting import TASKS, Run, forgetting, make_data
from bench.bench_learning import WINDOW


def test_acc_is_the_last_row_and_bwt_the_mean_loss_change_on_earlier_tasks() -> None:
    matrix = [
        [1.0, 5.0, 5.0],
        [3.0, 1.5, 5.0],
        [2.0, 2.5, 0.5],
    ]
    acc, bwt = forgetting(matrix)
    assert acc == pytest.approx((2.0 + 2.5 + 0.5) / 3)
    # Task A: 1.0 right after it, 2.0 after C; task B: 1.5, then 2.5. Forgetting is negative.
    assert bwt == pytest.approx(((1.0 - 2.0) + (1.5 - 2.5)) / 2)
    # Losses that fell after later tasks are positive backward transfer.
    assert forgetting([[2.0, 9.0], [1.0, 1.0]])[1] == pytest.approx(1.0)


def test_the_matrix_rows_are_the_versions_that_end_each_task() -> None:
    run = Run(losses=[[float(v), float(v) + 0.5] for v in range(4)], boundaries=[1, 3])
    assert run.matrix == [[1.0, 1.5], [3.0, 3.5]]


def test_the_stream_goes_through_the_tasks_in_whole_windows_without_held_out_pairs() -> None:
    data = make_data(seed=0, words=40, repeats=2)
    assert len(data.events) == len(data.task_of_window) * WINDOW
    assert data.task_of_window == sorted(data.task_of_window)  # A, then B, then C
    assert set(data.task_of_window) == set(range(len(TASKS)))
    for w, task in enumerate(data.task_of_window):
        window = data.events[w * WINDOW : (w + 1) * WINDOW]
        assert {e.metadata["segment"] for e in window if e.metadata} == {TASKS[task]}
    trained = {e.prompt for e in data.events}
    for held in data.held_out:
        assert held and not trained & {prompt for prompt, _ in held}
    assert make_data(seed=0, words=40, repeats=2) == data  # the seed alone decides it
    assert make_data(seed=1, words=40, repeats=2).events != data.events
