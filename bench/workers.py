"""The worker processes a benchmark starts, and what it reads of them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorastream.dev.workers import Worker
from lorastream.ops.admin import delete_topics, list_topics
from trainer.kafka import KafkaConnection

__all__ = ["bench_workers", "peak_rss"]


@contextmanager
def bench_workers(bootstrap: str, prefix: str) -> Iterator[dict[str, Worker]]:
    """A dict for the bench's workers, by name. On the way out every one is stopped (the
    last lines of each log printed if the bench failed) and the ``prefix`` topics go."""
    workers: dict[str, Worker] = {}
    try:
        yield workers
    except BaseException:
        for name, worker in workers.items():
            worker.terminate()
            tail = "\n    ".join(worker.output().splitlines()[-12:])
            print(f"last lines of the {name}'s log:\n    {tail}")
        raise
    finally:
        for worker in workers.values():
            worker.terminate()

        async def remove() -> list[str]:
            found = await list_topics(KafkaConnection(bootstrap), prefix)
            return await delete_topics(KafkaConnection(bootstrap), [t.name for t in found])

        deleted = asyncio.run(remove())
        print(f"deleted {len(deleted)} topics {prefix}* on {bootstrap}")


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            todo.extend(int(c) for c in task.read_text().split())
    return found


def peak_rss(worker: Worker) -> tuple[int, int]:
    """Peak resident memory (VmHWM, bytes) of a live worker's process and of any it
    started, summed, and how many processes that was (``.venv/bin/lorastream`` is a
    Python script, so the Popen pid is the Python process itself)."""
    assert worker.proc is not None
    peaks = []
    for pid in _descendants(worker.proc.pid):
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        peaks += [int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM:")]
    return sum(peaks), len(peaks)
