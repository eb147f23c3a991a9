"""What the follower and the reconciler share: the announced versions, and how far the
reconciler has got with them.

The follower only adds announcements (:meth:`Announced.add`) and bumps
:attr:`Announced.generation`; the reconciler records its verdicts on each version and,
after a pass that reached the server, :attr:`Announced.handled`. The follower commits a
record's offset once ``handled`` has caught up with the generation the record arrived in.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from lorastream.serving.verify import Refusal
from schemas import ADAPTER_PATTERN, AdapterUpdate

__all__ = ["AdapterVersions", "Announced", "parse_version_name", "version_name"]


def version_name(adapter: str, version: int) -> str:
    """The server-side name of one version: never reused, so never stale."""
    return f"{adapter}-v{version}"


# The adapter rule is schemas' (anchored there); here it is one part of a longer name.
_ADAPTER = ADAPTER_PATTERN.removeprefix("^").removesuffix("$")
_NAME = re.compile(rf"^(?P<adapter>{_ADAPTER})-v(?P<version>[1-9][0-9]*)$")


def parse_version_name(name: str) -> tuple[str, int] | None:
    """The ``(adapter, version)`` of a name :func:`version_name` made; None for any other."""
    match = _NAME.match(name)
    return (match["adapter"], int(match["version"])) if match else None


@dataclass
class AdapterVersions:
    """One adapter's announced versions and what serve concluded about each."""

    updates: dict[int, AdapterUpdate] = field(default_factory=dict)
    file_checks: dict[int, Refusal | None] = field(default_factory=dict)
    refused: dict[int, Refusal] = field(default_factory=dict)
    gate: dict[int, Refusal | None] = field(default_factory=dict)
    """The promotion gate's verdict on each version, made once, in version order."""
    local: dict[int, str] = field(default_factory=dict)
    """Where a version announced on an object store was fetched to."""

    @property
    def promoted(self) -> list[int]:
        """The versions the gate let through, oldest first."""
        return sorted(v for v, verdict in self.gate.items() if verdict is None)


class Announced:
    """Every adapter's versions, plus the generation counters that tie offsets to passes."""

    def __init__(self) -> None:
        self.versions: dict[str, AdapterVersions] = {}
        self.generation = 0
        """Bumped by the follower for each announcement it adds."""
        self.handled = -1
        """The generation the last reconcile pass that reached the server started from."""
        self.wake = asyncio.Event()
        """Set when there is something new to reconcile (or serve is stopping)."""

    def add(self, update: AdapterUpdate) -> bool:
        """Record ``update``; False when its version was already known."""
        versions = self.versions.setdefault(update.adapter, AdapterVersions())
        if update.version in versions.updates:
            return False
        versions.updates[update.version] = update
        return True

    def newest(self) -> str:
        """``tutor v3, …`` for the log, or a sentence saying there is nothing yet."""
        return (
            ", ".join(
                f"{a} v{max(v.updates)}" for a, v in sorted(self.versions.items()) if v.updates
            )
            or "no adapter versions yet"
        )
