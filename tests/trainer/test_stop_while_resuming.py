"""A stop requested while the trainer still reads its lineages (a long history after an
assignment) ends the loop at once, instead of waiting for the read and then for the stop
deadline (#22)."""

from __future__ import annotations

import asyncio

from trainer.consumer import Trainer


def _bare() -> Trainer:
    trainer = Trainer.__new__(Trainer)  # only the two events this wait looks at
    trainer._ready = asyncio.Event()
    trainer._stopping = asyncio.Event()
    return trainer


async def test_a_stop_ends_the_wait_for_the_lineages() -> None:
    trainer = _bare()
    waiting = asyncio.ensure_future(trainer._ready_unless_stopping())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # still reading: it waits
    trainer.request_stop()
    assert await asyncio.wait_for(waiting, 1) is False


async def test_the_wait_ends_when_the_lineages_are_read() -> None:
    trainer = _bare()
    waiting = asyncio.ensure_future(trainer._ready_unless_stopping())
    await asyncio.sleep(0.05)
    trainer._ready.set()
    assert await asyncio.wait_for(waiting, 1) is True
    trainer.request_stop()  # already read, then stopped: the loop stops too
    assert await trainer._ready_unless_stopping() is False
