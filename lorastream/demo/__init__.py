"""``lorastream demo``: the whole pipeline on a real Kafka broker, explained as it runs.

A first run should teach the product. Each stage says what it does while it
does it: the broker (the local one is started if none answers, and stopped at
the end only then), fresh topics under a ``demo-<id>.`` prefix, a generated
data set with bad lines and bad records on purpose, the scorer and the trainer
as real worker processes, the announcements followed until every window is a
version, the dead letters read back with the reason in their headers, a
picture of the loss of every version, and the newest adapters loaded from
their announcements as a serving system would, with a greedy generation.

The data (:data:`TASKS`) and the training settings (:data:`TRAINING`) are the
demo's own. The built-in model is a random two-layer Llama over bytes: its
loss starts at chance, ln 384, and with these settings it learns each
adapter's responses by heart in a few dozen one-step windows, so that the
picture and the generation show learning rather than noise.

Clean-up runs on success, failure, Ctrl-C and SIGTERM alike: the workers are
stopped and, unless ``--keep``, the run's topics are deleted and its
temporary directory (data, logs, adapters) removed. Only the picture stays.

Nothing heavy is imported at module level: the first line must appear at once,
and torch, transformers and matplotlib are loaded only for the steps that use
them.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

from lorastream.demo import learned, steps
from lorastream.demo.cleanup import clean_up, signal_workers
from lorastream.demo.run import Run
from lorastream.settings import Settings

__all__ = ["run_demo"]


def run_demo(
    settings: Settings, console: Console, timeout: float = 600.0, keep: bool = False
) -> None:
    """Run the demo; everything it made is cleaned up on every path unless ``keep``."""
    console.print(
        "[bold]lorastream demo[/]: generation results → score → train LoRA → announce → load, "
        "on a real Kafka broker, in under a minute",
        highlight=False,
    )
    run = Run(settings, console, timeout, keep)
    with _sigterm_as_interrupt():
        try:
            _go(run)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: stopping the workers and cleaning up")
            run.interrupted = True
            raise
        except BaseException:
            run.failed = True
            raise
        finally:
            clean_up(run)


def _go(run: Run) -> None:
    steps.prepare_kafka(run)
    lines = steps.produce(run)
    expected = steps.start_workers(run, lines)
    steps.follow_versions(run, expected)
    steps.show_dead_letters(run)
    signal_workers(run)  # their work is done; they shut down while the demo goes on
    learned.picture(run, lines)
    learned.load(run)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so that ``kill`` cleans up as Ctrl-C does."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
