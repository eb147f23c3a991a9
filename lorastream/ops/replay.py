"""The replay job: check the request, plan it, train it; what it shows is the caller's.

The training itself is :class:`trainer.replay.Replay` (the live trainer's
windows, core and committer). This module checks the request before anything
is trained, each problem one :class:`~trainer.exceptions.ReplayError` line
(an unknown adapter, an empty range, offsets the cluster no longer retains
and why, a name already taken), and returns what it found: a
:class:`~trainer.replay.Plan` for a dry run, a :class:`~trainer.replay.ReplayReport`
for a run. It prints nothing: the progress it makes goes to a :class:`ReplayWatcher`,
and ``lorastream replay`` (:mod:`lorastream.cli.replay`) renders all of it.
"""

from __future__ import annotations

import asyncio
import re
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from lorastream.ops.admin import describe_retention, require_topics
from lorastream.settings import Settings
from lorastream.stages import replay_config, replay_decoder
from schemas import ADAPTER_PATTERN
from trainer.core import Outcome, Trained, WindowTrainer
from trainer.exceptions import ReplayError
from trainer.lineage import NAME_RULE
from trainer.lineage import existing as names_that_exist
from trainer.metrics import ReplayMetrics
from trainer.ranges import Bound, PartitionRange
from trainer.replay import Plan, Replay, ReplayReport

__all__ = [
    "Forgotten",
    "NothingToTrain",
    "PreparedReplay",
    "ReplayRequest",
    "ReplayTicks",
    "ReplayWatcher",
    "parse_bound",
    "plan_replay",
    "prepare_replay",
    "train_replay",
]

_OFFSET = re.compile(r"^[0-9]+$")


def parse_bound(flag: str, text: str | None) -> Bound | None:
    """An offset (digits) or an RFC 3339 time with its offset (``2026-11-27T10:00:00Z``)."""
    if text is None:
        return None
    text = text.strip()
    if _OFFSET.match(text):
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None or "T" not in text.upper():
        raise ReplayError(
            f"{flag} {text!r} is neither an offset nor an RFC 3339 time with its UTC offset "
            "(such as 2026-11-27T10:00:00Z)"
        )
    return moment


@dataclass(frozen=True)
class ReplayRequest:
    """What the user asked for, checked for what can be checked without Kafka."""

    source: str | None
    target: str | None
    start: Bound | None
    end: Bound | None
    rescore: bool
    resume: bool
    dry_run: bool

    @classmethod
    def of(
        cls,
        *,
        source: str | None,
        target: str | None,
        start: str | None,
        end: str | None,
        rescore: bool,
        resume: bool,
        dry_run: bool,
    ) -> ReplayRequest:
        if source is None and not dry_run:
            raise ReplayError("--adapter NAME is required (only --dry-run covers every adapter)")
        if target is None and not dry_run:
            raise ReplayError("--into NEW is required: the name of the lineage to train")
        for flag, name in (("--adapter", source), ("--into", target)):
            if name is not None and not re.match(ADAPTER_PATTERN, name):
                raise ReplayError(f"{flag} {name!r} is not an adapter name ({NAME_RULE})")
        if source is not None and source == target:
            raise ReplayError(
                f"--into {target} is the adapter being replayed; a new lineage needs a new name"
            )
        request = cls(
            source,
            target,
            parse_bound("--from", start),
            parse_bound("--to", end),
            rescore,
            resume,
            dry_run,
        )
        if (
            isinstance(request.start, int)
            and isinstance(request.end, int)
            and request.end < request.start
        ):
            raise ReplayError(f"--to {request.end} is before --from {request.start}")
        if (
            isinstance(request.start, datetime)
            and isinstance(request.end, datetime)
            and request.end < request.start
        ):
            raise ReplayError(f"--to {end} is before --from {start}")
        return request

    @property
    def has_range(self) -> bool:
        return self.start is not None or self.end is not None

    def describe_range(self) -> str:
        if not self.has_range:
            return "everything retained"
        start = "the oldest" if self.start is None else _bound(self.start)
        end = "the newest" if self.end is None else _bound(self.end)
        return f"from {start} to {end}"


def _bound(bound: Bound) -> str:
    return f"offset {bound}" if isinstance(bound, int) else bound.isoformat()


class ReplayTicks(Protocol):
    """Told of each event read and each window done, while a replay trains."""

    def event(self) -> None: ...

    def window(self) -> None: ...


class ReplayWatcher(Protocol):
    """What the caller shows while a replay trains (the operation prints nothing)."""

    def loading(self, base_model: str) -> AbstractContextManager[object]:
        """Around the loading of the base model (seconds)."""
        ...

    def resuming(self, adapter: str, version: int) -> None:
        """The lineage ``adapter`` exists at ``version`` (a --resume) and goes on from it."""
        ...

    def training(self, events: int, windows: int) -> AbstractContextManager[ReplayTicks]:
        """Around the training of ``events`` in ``windows``; ticks once for each."""
        ...


@dataclass(frozen=True)
class Forgotten:
    """Offsets of the range that the cluster no longer retains, and why (its retention)."""

    topic: str
    ranges: list[PartitionRange]
    why: str

    def describe(self) -> str:
        """``topic[p] offsets a..b (the log now starts at c)``, for each partition."""
        return ", ".join(
            f"{r.tp.topic}[{r.tp.partition}] offsets {r.gone[0]}..{r.gone[1]} (the log now starts at {r.log_start})"
            for r in self.ranges
            if r.gone is not None
        )


@dataclass(frozen=True)
class PreparedReplay:
    """A request checked against Kafka: ready to plan or to train.

    ``forgotten`` is set when the oldest events are gone and no --from was given: the
    replay starts at the oldest record kept, which the user should be told."""

    settings: Settings
    request: ReplayRequest
    replay: Replay
    topic: str
    forgotten: Forgotten | None


@dataclass(frozen=True)
class NothingToTrain:
    """No full window to train: the lineage ``target`` is at ``version`` (0: none yet),
    and ``open_events`` of ``source`` wait in a partial window of ``window_size``."""

    target: str
    version: int
    source: str
    open_events: int
    window_size: int


def prepare_replay(settings: Settings, request: ReplayRequest) -> PreparedReplay:
    """Resolve the request's range on Kafka; raise a LorastreamError on any problem."""
    config = replay_config(
        settings,
        source=request.source,
        target=request.target,
        rescore=request.rescore,
        start=request.start,
        end=request.end,
        resume=request.resume,
    )
    replay = Replay(config, replay_decoder(settings, request.source, request.rescore))
    ranges = asyncio.run(replay.resolve())
    forgotten = asyncio.run(_check_retention(settings, request, config.topic, ranges))
    return PreparedReplay(settings, request, replay, config.topic, forgotten)


def plan_replay(prepared: PreparedReplay) -> Plan:
    """The dry run: the events and windows per adapter; nothing is trained."""
    plan = asyncio.run(prepared.replay.plan())
    asyncio.run(_check_found(prepared, plan))
    return plan


def train_replay(
    prepared: PreparedReplay, watcher: ReplayWatcher, metrics: ReplayMetrics | None = None
) -> ReplayReport | NothingToTrain:
    """Train and announce the new lineage; raise a LorastreamError on any problem.
    ``metrics`` count the events read, the windows and the versions announced."""
    settings = prepared.settings
    topics = settings.topics
    asyncio.run(  # where the versions go: a missing one is one line, not a commit that hangs
        require_topics(
            settings.kafka_connection(),
            [topics.adapter_updates, topics.adapter_latest, topics.quarantine],
        )
    )
    return asyncio.run(_train(prepared, watcher, metrics or ReplayMetrics()))


async def _check_retention(
    settings: Settings,
    request: ReplayRequest,
    topic: str,
    ranges: list[PartitionRange],
) -> Forgotten | None:
    gone = [r for r in ranges if r.gone is not None]
    if not gone:
        return None
    retention = await describe_retention(settings.kafka_connection(), [topic])
    why = retention[topic].describe() if topic in retention else "its retention"
    forgotten = Forgotten(topic, gone, why)
    if request.start is None:
        return forgotten
    first = min(r.log_start for r in gone)
    raise ReplayError(
        f"the range starts before what Kafka retains: {forgotten.describe()} are gone "
        f"({topic} has {why}); replay from --from {first} or later"
    )


async def _check_found(prepared: PreparedReplay, plan: Plan) -> None:
    """An adapter with no events: unknown (nothing at all) or an empty range."""
    request, topic = prepared.request, prepared.topic
    if request.source is None:
        if not plan.adapters:
            raise ReplayError(f"no events in {topic} ({request.describe_range()})")
        return
    counts = plan.adapters.get(request.source)
    if counts is not None and counts.seen > 0:
        return
    if request.has_range:
        raise ReplayError(
            f"adapter {request.source} has no events in {topic} {request.describe_range()} "
            "(an empty range)"
        )
    # The plan counted the source's events only: the names that exist take a second read.
    every = Replay(
        prepared.replay.config,
        replay_decoder(prepared.settings, None, request.rescore),
    )
    known = (await every.plan()).adapters
    raise ReplayError(
        f"unknown adapter {request.source}: {topic} holds no events of it; "
        f"{names_that_exist(request.source, known)}"
    )


async def _train(
    prepared: PreparedReplay, watcher: ReplayWatcher, metrics: ReplayMetrics
) -> ReplayReport | NothingToTrain:
    request, replay = prepared.request, prepared.replay
    config = replay.config
    assert request.source is not None
    async with replay.session() as session:
        existing = session.lineage
        plan = await replay.plan(target=existing)
        await _check_found(prepared, plan)
        counts = plan.adapters[request.source]
        if counts.windows == 0:
            return NothingToTrain(
                existing.adapter,
                existing.version,
                request.source,
                counts.open_events,
                config.training.window_size,
            )
        with watcher.loading(config.training.base_model_name):
            core = await asyncio.to_thread(WindowTrainer.load, config.training)
        if existing.version:
            watcher.resuming(existing.adapter, existing.version)
        with watcher.training(counts.events, counts.windows) as ticks:

            def on_event() -> None:
                ticks.event()
                metrics.events.inc()

            def on_window(outcome: Outcome) -> None:
                ticks.window()
                if isinstance(outcome, Trained):
                    metrics.windows.labels("trained").inc()
                    metrics.announced.inc()
                    metrics.version.labels(outcome.update.adapter).set(outcome.update.version)
                else:
                    metrics.windows.labels("quarantined").inc()

            return await replay.run(core, session, on_event=on_event, on_window=on_window)
