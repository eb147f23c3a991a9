"""Fault injection for the crash and failure tests, off unless asked for.

The trainer's guarantees are about what happens when a process dies at an
exact point, or a step goes bad; timing alone cannot hit a 12 ms step. A
spec (``LORASTREAM_FAULTS``, comma-separated) names the points:

``nan:EVENT_ID``                       every window holding that event trains on weights made NaN,
                                       so the real step produces a NaN loss
``pause:step:ADAPTER:VERSION``         stop for good inside the step that would make VERSION
``pause:commit:ADAPTER:VERSION``       stop for good after VERSION's files are durable, before
                                       the Kafka transaction
``fail:commit-inside:ADAPTER:VERSION`` raise inside VERSION's transaction (it must abort)
``full:PATH``                          every adapter write fails with ENOSPC (no space left on
                                       device) for as long as the file PATH exists

A paused trainer prints ``FAULT paused at <stage> <adapter> v<version>`` to stderr
and sleeps until killed; the tests SIGKILL it there.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.exceptions import TrainerError
from trainer.lora import AdapterState

__all__ = ["Faults", "InjectedFault"]


class InjectedFault(TrainerError):
    """Raised where a ``fail:`` fault asks for it."""


@dataclass(frozen=True)
class Faults:
    nan_event_ids: frozenset[str] = frozenset()
    points: frozenset[tuple[str, str, str, int]] = field(default_factory=frozenset)
    full_while: Path | None = None

    @classmethod
    def parse(cls, spec: str | None) -> Faults:
        if not spec:
            return cls()
        nan: set[str] = set()
        points: set[tuple[str, str, str, int]] = set()
        full: Path | None = None
        for item in (part.strip() for part in spec.split(",")):
            fields = item.split(":")
            if len(fields) == 2 and fields[0] == "nan":
                nan.add(fields[1])
            elif len(fields) == 2 and fields[0] == "full":
                full = Path(fields[1])
            elif len(fields) == 4 and fields[0] in ("pause", "fail") and fields[3].isdigit():
                points.add((fields[0], fields[1], fields[2], int(fields[3])))
            else:
                raise TrainerError(
                    f"LORASTREAM_FAULTS: cannot read {item!r}; expected nan:EVENT_ID, "
                    "pause:STAGE:ADAPTER:VERSION, fail:STAGE:ADAPTER:VERSION or full:PATH"
                )
        return cls(frozenset(nan), frozenset(points), full)

    def __bool__(self) -> bool:
        return bool(self.nan_event_ids or self.points or self.full_while)

    def disk(self, directory: Path) -> None:
        """Raise ENOSPC, as a full disk would, while the ``full:`` file exists."""
        if self.full_while is not None and self.full_while.exists():
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected)", str(directory))

    def poison(self, state: AdapterState, event_ids: list[str]) -> AdapterState:
        """A copy of ``state`` with NaN weights when the window holds a poisoned event."""
        if not self.nan_event_ids.intersection(event_ids):
            return state
        weights = {name: torch.full_like(t, float("nan")) for name, t in state.weights.items()}
        return AdapterState(weights=weights, optimizer=state.optimizer, steps=state.steps)

    def at(self, stage: str, adapter: str, version: int) -> None:
        if ("fail", stage, adapter, version) in self.points:
            raise InjectedFault(f"injected failure at {stage} of {adapter} v{version}")
        if ("pause", stage, adapter, version) in self.points:
            print(f"FAULT paused at {stage} {adapter} v{version}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
