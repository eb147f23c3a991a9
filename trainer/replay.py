"""Replay: retrain a lineage from the log, exactly as the live trainer trained it.

A replay reads one adapter's events from a range of a topic, groups them
with the live trainer's own rule (:meth:`~trainer.window.Windows.offer`),
trains every full window with the shared core
(:class:`~trainer.core.WindowTrainer`) into a NEW lineage, announces each
version through the same :class:`~trainer.committer.Committer` and, once it
is committed, records it in the lineage. It is a job:
it runs to the end of the range and stops.

Its progress is its lineage. The committed announcements of ``target`` say
which source offsets are handled, so a replay killed at any point and run
again (``resume``) skips what is announced, repeats the window it was in and
never announces a version twice. Its transactional id is derived from the
target, so a rerun also aborts whatever transaction the killed one left open.
A target that the live pipeline owns (its events on ``learning-events``, or
records that no replay into it wrote) is refused (:meth:`Replay.check_owner`):
a lineage has one writer, and ``resume`` continues only a replay's own.

Events come from a *decoder*: a function from a Kafka record to a
LearningEvent (or None: not this adapter's, or not qualifying). The plain
decoder reads ``learning-events``; the face builds a re-scoring decoder for
``generation-results`` from the scoring stage's rule, which this package
does not import.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas import (
    AdapterUpdate,
    KafkaPosition,
    LearningEvent,
    QuarantineRecord,
    SchemaError,
    StepGroup,
    decode,
)
from trainer.committed import first_keyed
from trainer.committer import Committer, announce
from trainer.config import ReplayConfig
from trainer.core import Outcome, Trained, WindowTrainer
from trainer.exceptions import ReplayError
from trainer.history import LineageLog
from trainer.lineage import Lineage
from trainer.ranges import PartitionRange, read_range, resolve_range
from trainer.window import Windows

__all__ = [
    "AdapterPlan",
    "Decoder",
    "Plan",
    "Replay",
    "ReplayReport",
    "Replayed",
    "Session",
    "learning_event_decoder",
]

Decoder = Callable[[ConsumerRecord[bytes, bytes]], LearningEvent | None]
"""A record → its LearningEvent, or None; raises SchemaError for a record that is unreadable."""


def learning_event_decoder(adapter: str | None) -> Decoder:
    """Read ``learning-events`` records; only ``adapter``'s (by key, then by field) if given."""
    key = adapter.encode() if adapter is not None else None

    def decoder(record: ConsumerRecord[bytes, bytes]) -> LearningEvent | None:
        if key is not None and record.key != key:
            return None  # the scorer keys every event by its adapter: skip the others unread
        position = KafkaPosition(record.topic, record.partition, record.offset)
        event = decode(record.value, LearningEvent, position=position)
        return event if adapter is None or event.adapter == adapter else None

    return decoder


@dataclass
class AdapterPlan:
    """What a replay of one adapter's events would train."""

    adapter: str
    events: int = 0  # admitted into windows
    held_out: int = 0  # admitted into the evaluation set, never trained on
    skipped: int = 0  # duplicates, or handled by the target lineage already
    windows: int = 0  # full windows: one version each
    open_events: int = 0  # in the last, partial window: not trained

    @property
    def seen(self) -> int:
        return self.events + self.held_out + self.skipped


@dataclass
class Plan:
    ranges: list[PartitionRange]
    adapters: dict[str, AdapterPlan] = field(default_factory=dict)
    records: int = 0
    unreadable: int = 0


@dataclass(frozen=True)
class Session:
    """A replay's committer (started) and lineages; ``lineage`` is the one it trains."""

    committer: Committer
    history: LineageLog
    lineage: Lineage


@dataclass(frozen=True)
class Replayed:
    """One version a replay announced (its weights stay on disk, not in the report)."""

    update: AdapterUpdate
    step_seconds: float


@dataclass
class ReplayReport:
    """What a replay did: the versions it announced, the windows it quarantined."""

    source: str
    target: str
    trained: list[Replayed] = field(default_factory=list)
    quarantined: list[QuarantineRecord] = field(default_factory=list)
    resumed_at: int = 0  # the target's version when this run started
    events: int = 0  # read and admitted into windows, the open one included
    held_out: int = 0  # read and kept for evaluation (never trained on)
    open_events: int = 0  # in the last, partial window: not trained
    seconds: float = 0.0

    @property
    def trained_events(self) -> int:
        return sum(t.update.window.size for t in self.trained)


class Replay:
    """One replay job; see the module docstring. ``plan`` for a dry run, ``run`` to train."""

    def __init__(self, config: ReplayConfig, decoder: Decoder) -> None:
        self.config = config
        self.decoder = decoder
        self.ranges: list[PartitionRange] | None = None

    async def resolve(self) -> list[PartitionRange]:
        """The offsets to read per partition (``gone`` says what the log no longer holds)."""
        cfg = self.config
        self.ranges = await resolve_range(cfg.kafka, cfg.topic, cfg.start, cfg.end)
        return self.ranges

    async def _events(
        self, plan: Plan, starts: dict[TopicPartition, int] | None = None
    ) -> AsyncGenerator[tuple[TopicPartition, int, LearningEvent], None]:
        """Every event of the range, decoded: ``(partition, offset, event)``, each partition
        in offset order. Unreadable records are counted in ``plan``, never trained."""
        cfg = self.config
        ranges = self.ranges if self.ranges is not None else await self.resolve()
        batches = read_range(cfg.kafka, ranges, starts)
        async with aclosing(batches):
            async for batch in batches:
                for record in batch:
                    plan.records += 1
                    try:
                        event = self.decoder(record)
                    except SchemaError:
                        plan.unreadable += 1
                        continue
                    if event is not None:
                        yield TopicPartition(record.topic, record.partition), record.offset, event

    async def plan(self, target: Lineage | None = None) -> Plan:
        """Count the events and windows per adapter, training nothing (the dry run).

        With ``target``, the adapter's events are counted as they would be
        for that lineage: what it has handled is skipped.
        """
        ranges = self.ranges if self.ranges is not None else await self.resolve()
        plan = Plan(ranges)
        training = self.config.training
        windows = Windows(training.window_size, training.eval_fraction)
        shadows: dict[str, Lineage] = {}

        events = self._events(plan)
        async with aclosing(events):
            async for tp, offset, event in events:
                counts = plan.adapters.setdefault(event.adapter, AdapterPlan(event.adapter))
                lineage = shadows.get(event.adapter)
                if lineage is None:
                    lineage = shadows[event.adapter] = (
                        _copy(target) if target else Lineage(event.adapter)
                    )
                admitted, closed = windows.offer(tp, offset, event, lineage)
                if not admitted:
                    counts.skipped += 1
                elif windows.holds_out(event.id):
                    counts.held_out += 1
                else:
                    counts.events += 1
                if closed is not None:
                    counts.windows += 1
                    lineage.record_window(closed.spec())  # as its commit would
                    windows.settle(closed)
        for window in windows.open_windows():
            plan.adapters[window.adapter].open_events += len(window.events)
        return plan

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """The committer, started, and the lineages read after it (in that order: starting
        it aborts what a killed run left open, so the lineages hold exactly what that run
        committed); the target lineage is checked (:meth:`target_lineage`)."""
        cfg = self.config
        committer = Committer(cfg.kafka, cfg.transactional_id, None, announce_key=cfg.verifier.key)
        await committer.start()
        try:
            history = LineageLog(
                cfg.kafka,
                cfg.topics.adapter_updates,
                cfg.topics.quarantine,
                verifier=cfg.verifier,
            )
            await history.refresh()
            await self.check_owner(history)
            yield Session(committer, history, self.target_lineage(history))
        finally:
            await committer.stop()

    async def check_owner(self, history: LineageLog) -> None:
        """Refuse a target that the live pipeline owns: one with records on ``adapter-updates``
        or the quarantine not written by this replay's transactional id (the writer header,
        :mod:`trainer.signing`; a record without one is not a replay's), or with events on
        ``learning-events`` (the scorer keys each by its adapter). A name has one writer:
        the live trainer would announce its own versions over the replay's."""
        cfg = self.config
        assert cfg.target is not None
        target = cfg.target
        others = history.writers.get(target, set()) - {cfg.transactional_id}
        if others:
            named = sorted(w for w in others if w is not None)
            if None in others:
                named.append("a writer that did not name itself (no lorastream-writer header)")
            raise ReplayError(
                f"--into {target} is an adapter the live pipeline owns: its records on "
                f"{cfg.topics.adapter_updates} were written by {', '.join(named)}, not by a "
                f"replay into {target}; choose another --into"
            )
        event = await first_keyed(cfg.kafka, cfg.topics.learning_events, target)
        if event is not None:
            raise ReplayError(
                f"--into {target} is an adapter the live pipeline owns: "
                f"{event.topic}[{event.partition}]@{event.offset} is an event of it, which the "
                "live trainer would train; choose another --into"
            )

    def target_lineage(self, history: LineageLog) -> Lineage:
        """The lineage to train into: new, or (``resume``) the one a killed replay left."""
        cfg = self.config
        assert cfg.target is not None
        existing = history.lineages.get(cfg.target)
        if existing is not None and not existing.is_empty and not cfg.resume:
            quarantined = (
                f", {existing.quarantined} window(s) quarantined" if existing.quarantined else ""
            )
            raise ReplayError(
                f"{cfg.target} already has a lineage (v1–v{existing.version}{quarantined}); "
                "add --resume to continue it, or choose another --into"
            )
        return history.lineages.setdefault(cfg.target, Lineage(cfg.target))

    async def run(
        self,
        core: WindowTrainer,
        session: Session,
        on_event: Callable[[], None] | None = None,
        on_window: Callable[[Outcome], None] | None = None,
    ) -> ReplayReport:
        """Train the source's windows into the session's target lineage, to the range's end."""
        cfg = self.config
        assert cfg.source is not None and cfg.target is not None
        lineage, committer = session.lineage, session.committer
        report = ReplayReport(cfg.source, cfg.target, resumed_at=lineage.version)
        started = time.perf_counter()
        windows = Windows(cfg.training.window_size, cfg.training.eval_fraction)
        plan = Plan(self.ranges or [])
        starts = {tp: offset + 1 for tp, offset in lineage.handled.items()}
        groups = self._groups(session.history)

        events = self._events(plan, starts)
        try:
            async with aclosing(events):
                async for tp, offset, event in events:
                    admitted, closed = windows.offer(tp, offset, event, lineage)
                    if admitted and windows.holds_out(event.id):
                        report.held_out += 1
                    elif admitted:
                        report.events += 1
                        if on_event is not None:
                            on_event()
                    if closed is None:
                        continue
                    group = groups.get(tuple(closed.ids))
                    outcome = await core.train_waiting(closed, lineage, group=group)
                    version = lineage.version + 1
                    await committer.commit(
                        announce(outcome, lineage, cfg.topics),
                        inside=partial(core.faults.at, "commit-inside", lineage.adapter, version),
                    )
                    windows.settle(closed)
                    if isinstance(outcome, Trained):
                        lineage.record(outcome.update)
                        report.trained.append(Replayed(outcome.update, outcome.step_seconds))
                    else:
                        lineage.record(outcome)
                        report.quarantined.append(outcome)
                    if on_window is not None:
                        on_window(outcome)
        except BaseException:
            committer.fail()
            raise
        report.open_events = sum(len(w.events) for w in windows.open_windows())
        report.seconds = time.perf_counter() - started
        return report

    def _groups(self, history: LineageLog) -> dict[tuple[str, ...], StepGroup]:
        """The groups the source's windows were stepped in (``window.group`` of its
        announcements), by the window's event ids, each named for the target: a window
        the replay closes with the same events is stepped in the same batch's shape."""
        cfg = self.config
        assert cfg.source is not None and cfg.target is not None
        source = history.lineages.get(cfg.source)
        if source is None:
            return {}
        return {
            tuple(update.window.event_ids): update.window.group.named(cfg.source, cfg.target)
            for update in source.updates
            if update.window.group is not None
        }


def _copy(lineage: Lineage) -> Lineage:
    return Lineage(
        lineage.adapter,
        list(lineage.updates),
        set(lineage.trained_ids),
        dict(lineage.handled),
        set(lineage.quarantined_windows),
    )
