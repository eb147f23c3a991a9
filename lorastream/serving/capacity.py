"""How many adapters the server will hold, which versions get the room, and when a load
that failed is tried again.

vLLM never refuses a load for room: ``--max-loras`` is the number of adapters in one
batch (GPU slots) and ``--max-cpu-loras`` the size of an LRU cache in CPU memory; every
loaded name stays registered, and one that fell out of the cache is read from disk again
when a request names it. SGLang's ``--max-loaded-loras`` was a hard limit from its
introduction (sglang#8650) until sglang#11526 made it an LRU cache too: in between, a load
past it is answered 400, "Maximum number of loaded LoRA adapters is N. Please unload some
LoRA adapters before loading new ones." (:class:`~lorastream.serving.exceptions.BackendFull`).

When a server refuses for room, :class:`Capacity` takes the number of versions serve
then holds there as the limit, and :meth:`Capacity.wanted` shares it out: every adapter's
newest kept version first, then every adapter's second newest, and so on; adapters that
already have a version loaded before those that have none, so that room is never taken
from one adapter to give it to another. What falls outside is unloaded after the drain,
which makes room for what is inside. A server restart forgets the limit (it may have
changed with the restart).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lorastream.serving.versions import version_name

__all__ = ["Capacity", "Retries"]

log = logging.getLogger(__name__)


@dataclass
class Capacity:
    """The most versions the server holds at once, once it has refused a load for room."""

    limit: int | None = None

    def learn(self, holding: int, url: str, refused: str, reason: str) -> None:
        """The server at ``url`` refused ``refused`` while serve held ``holding`` versions
        there: that is its limit (a lower one than known replaces it)."""
        if self.limit is not None and self.limit <= holding:
            return
        self.limit = holding
        log.warning(
            "the inference server at %s refused %s for room: it holds at most %d adapters "
            "(%s). Each adapter's newest version gets the room first; older versions are "
            "unloaded after their drain to make it.",
            url,
            refused,
            holding,
            reason,
        )

    def forget(self) -> None:
        self.limit = None

    def wanted(self, kept: Mapping[str, list[int]], loaded: Iterable[tuple[str, int]]) -> set[str]:
        """The server-side names that get the room: all of ``kept`` (each adapter's versions
        to keep, oldest first) while no limit is known, else the first ``limit`` of them by
        (age rank within the adapter, adapter without a loaded version last, adapter)."""
        names = {version_name(a, v) for a, versions in kept.items() for v in versions}
        if self.limit is None or len(names) <= self.limit:
            return names
        holding = {adapter for adapter, _ in loaded}
        ranked = sorted(
            (rank, adapter not in holding, adapter, version)
            for adapter, versions in kept.items()
            for rank, version in enumerate(sorted(versions, reverse=True))
        )
        return {version_name(a, v) for _, _, a, v in ranked[: self.limit]}


@dataclass
class Retries:
    """Per server-side name: when a load that failed (refused for room, or answered but
    not listed by the server) may be tried again, with backoff."""

    start: float
    most: float
    _due: dict[str, tuple[float, float]] = field(default_factory=dict)

    def failed(self, name: str) -> float:
        """Record a failed try of ``name``; the seconds until the next."""
        _, delay = self._due.get(name, (0.0, self.start / 2))
        delay = min(max(delay * 2, self.start), self.most)
        self._due[name] = (time.monotonic() + delay, delay)
        return delay

    def waiting(self, name: str) -> bool:
        """Whether ``name`` failed recently and its next try is not due yet."""
        entry = self._due.get(name)
        return entry is not None and entry[0] > time.monotonic()

    def succeeded(self, name: str) -> None:
        self._due.pop(name, None)

    def next_due(self) -> float | None:
        """The monotonic time the next waiting try is due, or None."""
        now = time.monotonic()
        return min((due for due, _ in self._due.values() if due > now), default=None)
