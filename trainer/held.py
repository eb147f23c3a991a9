"""The adapters a live trainer holds: why each is held, and when to check them again.

An adapter whose newest version's files are not as announced, or whose LoRA
setting differs from its lineage's, is held alone (the reasons are
:mod:`trainer.hold_reasons`'): its window waits, uncommitted, and the others go on.
Every ``recheck_seconds`` each held adapter is checked again, by the core's
own check (:meth:`~trainer.core.WindowTrainer.state_of`); the driver reads its
partitions again once a hold is lifted.
"""

from __future__ import annotations

import asyncio
import logging

from trainer.core import WindowTrainer
from trainer.exceptions import AdapterHeld
from trainer.lineage import Lineage
from trainer.metrics import TrainerMetrics
from trainer.progress import at
from trainer.window import Window, Windows

__all__ = ["Holds"]

# The live trainer's lines, under the name they have always had in its log.
log = logging.getLogger("trainer.consumer")


class Holds:
    """The held adapters of one live trainer, with the reason for each."""

    def __init__(self, metrics: TrainerMetrics, recheck_seconds: float) -> None:
        self.metrics = metrics
        self.recheck_seconds = recheck_seconds
        self.reasons: dict[str, str] = {}
        self._checked = 0.0  # when they were last checked (or one was last held)

    def __len__(self) -> int:
        """How many adapters are held: a trainer holding none is falsy."""
        return len(self.reasons)

    def __contains__(self, adapter: object) -> bool:
        return adapter in self.reasons

    def hold(self, window: Window, held: AdapterHeld) -> None:
        """Hold ``held.adapter`` (``window`` is the one it could not train); said once per
        reason."""
        self.metrics.held.labels(held.adapter).set(1)
        if self.reasons.get(held.adapter) != held.reason:
            log.error(
                "%s is on hold, its windows wait (the other adapters go on): %s",
                held.adapter,
                held.reason,
                extra=at(window.tp, window.first_offset),
            )
        self.reasons[held.adapter] = held.reason
        self._checked = asyncio.get_running_loop().time()

    async def release(
        self, core: WindowTrainer, lineages: dict[str, Lineage], windows: Windows
    ) -> list[str]:
        """Every ``recheck_seconds``, check each held adapter again; return those whose hold
        is lifted: they check out, or their partition moved to another trainer."""
        if not self.reasons:
            return []
        now = asyncio.get_running_loop().time()
        if now - self._checked < self.recheck_seconds:
            return []
        self._checked = now
        released = []
        for adapter in sorted(self.reasons):
            if adapter not in windows.pinned():
                released.append(adapter)  # its partition moved to another trainer
                continue
            lineage = lineages.get(adapter, Lineage(adapter))
            core.forget({a: lin for a, lin in lineages.items() if a != adapter})
            try:
                await asyncio.to_thread(core.state_of, lineage)
            except AdapterHeld as held:
                if held.reason != self.reasons[adapter]:
                    log.error("%s is still on hold: %s", adapter, held.reason)
                    self.reasons[adapter] = held.reason
                continue
            log.warning("%s: its files and settings check out again; the hold is lifted", adapter)
            released.append(adapter)
        for adapter in released:
            del self.reasons[adapter]
            self.metrics.held.labels(adapter).set(0)
        return released
