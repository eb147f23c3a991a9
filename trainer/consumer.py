"""The live trainer: learning-events → windows → LoRA steps → adapter-updates, exactly once.

This module is only the Kafka loop. It reads records in a consumer group,
hands each adapter's events to :class:`~trainer.window.Windows`, gives every
closed window to the shared core (:class:`~trainer.core.WindowTrainer`: step,
retries, durable files) and the outcome to the
:class:`~trainer.committer.Committer`, which announces it (or quarantines the
window) in ONE transaction with the offsets up to which everything is
handled. A crash before that commit repeats the window; after it, nothing
can lose it.

One adapter's fault stops only that adapter (:mod:`trainer.held`): the
trainer pins its window (nothing of that partition is committed past its
first event) and goes on with the others; once the adapter checks out again
(``lorastream adapters repair``, or the setting back), it reads the
partitions again from their committed offsets, and the held windows train.
"""

from __future__ import annotations

import asyncio
import logging
import re
from functools import partial

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from schemas import (
    ADAPTER_PATTERN,
    KafkaPosition,
    LearningEvent,
    QuarantineRecord,
    SchemaError,
    SourcePosition,
    decode,
)
from schemas.limits import clip
from trainer.claims import Claim, claim_instance, still_unclaimed
from trainer.committer import Committer, Outgoing, announce, quarantine
from trainer.config import TrainerConfig
from trainer.core import Outcome, Trained, WindowTrainer
from trainer.exceptions import AdapterHeld, TrainerError
from trainer.held import Holds
from trainer.history import LineageLog
from trainer.kafka import kafka_errors, stop_consumer
from trainer.lineage import Lineage
from trainer.metrics import TrainerMetrics
from trainer.progress import Progress, at
from trainer.snapshot import completion
from trainer.window import Window, Windows

__all__ = ["Trainer"]

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(ADAPTER_PATTERN)


class _Rebalance(ConsumerRebalanceListener):
    """Keeps windows and lineages right when partitions move between trainers."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # aiokafka waits for this callback before the group moves on. Waiting here for the
        # window in flight means its transaction (offsets included) is committed before the
        # partition's next owner reads the committed offset: TxnOffsetCommit v0 carries no
        # generation, so nothing on the broker would stop a late commit from this instance.
        trainer = self.trainer
        async with trainer._busy:
            trainer._ready.clear()
            # Records fetched before now belong to the old assignment: aiokafka may still
            # list the partition (or give it back to us, to be read again from the
            # committed offset), so the loop drops the rest of its batch on a new generation.
            trainer._generation += 1
            await trainer._commit_offsets(force=True, why="on revocation")
            trainer.windows.drop(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        # An exception here would only be logged by aiokafka's coordinator; the loop re-raises it.
        self.trainer._generation += 1
        self.trainer.windows.keep_only(set(assigned))
        try:
            await self.trainer.resume()
        except Exception as exc:
            self.trainer._resume_error = exc
            self.trainer._ready.set()


class Trainer:
    """One live trainer instance; ``async with Trainer(config) as t: await t.run()``."""

    def __init__(self, config: TrainerConfig, metrics: TrainerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or TrainerMetrics()
        self.windows = Windows(config.training.window_size, config.training.eval_fraction)
        self.history = LineageLog(
            config.kafka,
            config.topics.adapter_updates,
            config.topics.quarantine,
            latest_topic=config.topics.adapter_latest,
            verifier=config.verifier.counting(self.metrics.reject),
        )
        self.core: WindowTrainer | None = None
        instance = config.instance
        # Named for real once claimed (start): no producer registers it before that.
        self.committer = Committer(
            config.kafka,
            instance.prefix + (instance.explicit or "unclaimed"),
            config.group_id,
            config.idle_commit_seconds,
            announce_key=config.verifier.key,
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._claim: Claim | None = None
        self._stopping = asyncio.Event()
        # aiokafka runs the rebalance listener in its coordinator task, concurrently with
        # getmany(): records can arrive before resume() has read the lineages. Nothing is
        # handled until the lineages for the current assignment are loaded.
        self._ready = asyncio.Event()
        self._resume_error: Exception | None = None
        # Held while a record is handled (a window trains and commits); a revocation waits for it.
        self._busy = asyncio.Lock()
        # Moves on every revocation and assignment: a batch fetched in an older generation
        # is dropped, its records are read again by whoever owns their partition now.
        self._generation = 0
        self.holds = Holds(self.metrics, config.hold_recheck_seconds)
        self.progress = Progress(self.metrics, config.training.window_size, config.max_wait_seconds)

    # ── lifecycle ────────────────────────────────────────────────────────────

    @property
    def transactional_id(self) -> str:
        """This instance's transactional id (claimed in :meth:`start`)."""
        return self.committer.transactional_id

    async def start(self) -> None:
        cfg = self.config
        try:
            if not await self._claim_id():
                return  # asked to stop while it waited for its id: run() returns at once
            self.core = await asyncio.to_thread(WindowTrainer.load, cfg.training, self.metrics)
            # Loading took a while: a trainer that took this id meanwhile on another machine
            # (they started together) would be fenced by our producer.
            await still_unclaimed(cfg.kafka, cfg.group_id, self.transactional_id)
            # The committer first: it aborts a killed predecessor's open transaction.
            await self.committer.start()
            self._consumer = AIOKafkaConsumer(
                group_id=cfg.group_id,
                # Other instances recognise this one's membership by it (trainer.claims).
                client_id=self.transactional_id,
                session_timeout_ms=int(cfg.session_timeout_seconds * 1000),
                enable_auto_commit=False,
                isolation_level="read_committed",
                auto_offset_reset="earliest",
                max_poll_interval_ms=30 * 60 * 1000,
                **cfg.kafka.client_kwargs(),
            )
            with kafka_errors(cfg.kafka.servers, f"joining group {cfg.group_id}"):
                await self._consumer.start()
        except BaseException:
            await self.stop()
            raise
        self._consumer.subscribe([cfg.topics.learning_events], listener=_Rebalance(self))
        log.info(
            "trainer %s: %s on %s (%s, %s), windows of %d",
            self.transactional_id,
            cfg.training.base_model_name,
            self.core.base.device,
            cfg.topics.learning_events,
            cfg.group_id,
            cfg.training.window_size,
        )

    async def stop(self) -> None:
        """Stop cleanly: offsets of fully handled records are committed, nothing half-done."""
        if self._consumer is not None:
            await self._commit_offsets(force=True, why="on stop")
            await stop_consumer(self._consumer)
            self._consumer = None
        await self.committer.stop()
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    async def _claim_id(self) -> bool:
        """Take this instance's transactional id before any producer registers it: a
        producer that did would fence the live trainer holding it (trainer.claims)."""
        cfg = self.config
        # A crashed member leaves once its session times out; a heartbeat more for slack.
        within = cfg.session_timeout_seconds + 3.0
        claiming = asyncio.ensure_future(
            claim_instance(cfg.kafka, cfg.group_id, cfg.instance, within)
        )
        # That wait must not hold up a SIGINT or SIGTERM (a stage stops within seconds).
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({claiming, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not claiming.done():
            claiming.cancel()
            await asyncio.wait({claiming})
            return False
        self._claim = claiming.result()
        self.committer.rename(self._claim.transactional_id)
        return True

    async def _ready_unless_stopping(self) -> bool:
        """Wait until the lineages are up to date (:meth:`resume`, after an assignment);
        False if a stop came first: reading a long history must not hold up a SIGINT."""
        if not self._ready.is_set():
            ready = asyncio.ensure_future(self._ready.wait())
            stopping = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            stopping.cancel()
        return self._ready.is_set() and not self._stopping.is_set()

    def request_stop(self) -> None:
        self._stopping.set()

    async def __aenter__(self) -> Trainer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ── the loop ─────────────────────────────────────────────────────────────

    async def run(self) -> None:
        """Consume until :meth:`request_stop`; a window in progress is finished first."""
        if self._consumer is None and self._stopping.is_set():
            return  # stopped during start, before it joined the group
        try:
            await self._run()
        except BaseException:
            # A window may have been taken out of Windows: committing on the way out
            # would move the offsets past it. It is read again instead.
            self.committer.fail()
            raise

    async def _run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while not self._stopping.is_set():
            generation = self._generation
            with kafka_errors(self.config.kafka.servers, "reading learning events"):
                batch = await consumer.getmany(timeout_ms=500, max_records=256)
                await self.progress.report_lag(consumer)
            if batch and not await self._ready_unless_stopping():
                break
            if self._resume_error is not None:
                raise self._resume_error
            records = [(tp, record) for tp, part in batch.items() for record in part]
            # Windows closed in this batch, not yet stepped: with adapters_per_step > 1 they
            # step together (up to that many), at the batch's end or once there are enough.
            closed: list[Window] = []
            for tp, record in records:
                async with self._busy:
                    if self._stopping.is_set():
                        break
                    if self._generation != generation:
                        closed = []  # dropped with the rest: read again from the committed offset
                        await self._rewind()  # the assignment changed while this batch waited
                        break
                    window = await self._handle(tp, record)
                    if window is not None:
                        closed = await self._gather(closed, window)
            self._report_skipped()
            async with self._busy:
                if self._generation != generation:
                    closed = []  # a rebalance dropped their partitions' windows meanwhile
                for window in self.windows.expired(self.config.max_wait_seconds):
                    closed = await self._gather(closed, window)
                if closed and not self._stopping.is_set():
                    await self._train(closed)
                await self._commit_offsets()
                await self._recheck_holds()
            if not batch:
                self.progress.report_pending(self.windows.pending())

    async def _rewind(self) -> None:
        """Read every assigned partition again from its committed offset.

        The rest of a batch fetched across a rebalance cannot be trusted: its records may
        be of the old assignment (their windows were dropped on revocation) or of the new
        one (fetched from the committed offset, and the position is now past them). Either
        way, reading again from the committed offset, with no window open, is right.
        """
        assert self._consumer is not None
        consumer = self._consumer
        assigned = set(consumer.assignment())
        self.windows.keep_only(set())
        for tp in assigned:
            with kafka_errors(self.config.kafka.servers, "reading the committed offsets"):
                committed = await consumer.committed(tp)
            if tp not in consumer.assignment():
                continue  # revoked by a rebalance while we read: its new owner positions it
            if committed is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)

    @property
    def lineages(self) -> dict[str, Lineage]:
        """Every adapter's lineage: the history's, which alone holds them; what this
        trainer commits, it records there (:meth:`_train`)."""
        return self.history.lineages

    def _lineage(self, adapter: str) -> Lineage:
        """``adapter``'s lineage (a new, empty one for an adapter never announced)."""
        return self.lineages.setdefault(adapter, Lineage(adapter))

    async def _refresh(self) -> None:
        """Read what was committed since (by other instances, by a replay) into the
        lineages; the core frees the states that no longer match them."""
        await self.history.refresh()
        assert self.core is not None
        self.core.forget(self.lineages)

    async def resume(self) -> None:
        """Bring every adapter's lineage up to date from Kafka (on start and on every
        assignment): what other instances or a replay committed meanwhile counts."""
        self._ready.clear()
        await self._refresh()
        if self.history.needs_snapshots and not self.committer.staged:
            await self._complete_snapshots()
        for adapter, lineage in self.lineages.items():
            self.metrics.version.labels(adapter).set(lineage.version)
        if self.lineages:
            log.info(
                "resumed: %s",
                ", ".join(f"{a} v{lin.version}" for a, lin in sorted(self.lineages.items())),
            )
        self._ready.set()

    async def _complete_snapshots(self) -> None:
        """The history was read in full (no complete snapshot topic yet): write every
        adapter's snapshot and the completion record in one transaction, so that the next
        start reads one record per adapter (trainer.snapshot)."""
        records = completion(self.lineages, by=self.transactional_id, unreadable=self.history.stray)
        topic = self.config.topics.adapter_latest
        await self.committer.commit([Outgoing(topic, key, value) for key, value in records])
        self.history.needs_snapshots = False
        log.info(
            "wrote the snapshots of %d adapter(s) to %s: later starts read those, not the "
            "whole history",
            len(records) - 1,
            topic,
        )

    async def _handle(
        self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]
    ) -> Window | None:
        """Read one record into its adapter's window: the window, if it closed it."""
        position = KafkaPosition(tp.topic, tp.partition, record.offset)
        try:
            event = decode(record.value, LearningEvent, position=position)
        except SchemaError as exc:
            if record.offset <= self.history.unreadable.get(tp, -1):
                self.windows.mark_read(tp, record.offset)  # quarantined before a rebalance
                self.metrics.skipped.inc()
            else:
                self._quarantine_record(tp, record, exc)
            return None
        admitted, window = self.windows.offer(
            tp, record.offset, event, self._lineage(event.adapter)
        )
        if not admitted:
            self.metrics.skipped.inc()
        return window

    async def _gather(self, closed: list[Window], window: Window) -> list[Window]:
        """Add the closed ``window`` to those waiting to step; step them when there are
        ``adapters_per_step``, or first if its adapter already has one waiting (the new
        window steps on that one's version). What still waits."""
        if any(w.adapter == window.adapter for w in closed):
            await self._train(closed)
            closed = []
        closed = [*closed, window]
        if len(closed) >= self.config.training.adapters_per_step:
            await self._train(closed)
            return []
        return closed

    def _report_skipped(self) -> None:
        """One line per partition and batch for the events skipped as already trained or
        in an open window: a scorer's re-delivery, a re-produce, or records read again."""
        for skipped in self.windows.take_skipped():
            log.info(
                "skipped %s events already trained or in an open window (re-delivered or "
                "read again): %s",
                skipped.count,
                skipped,
                extra=at(skipped.tp, skipped.last_offset),
            )

    async def _train(self, windows: list[Window]) -> None:
        """Ask the core for the outcomes of ``windows`` (of different adapters: stepped
        together where ``adapters_per_step`` allows), have the committer commit them all
        with the offsets in one transaction, and only then record them in the lineages: a
        crash before the commit repeats the windows, and nothing is recorded that was not
        committed. An adapter put on hold is held alone; the others are committed."""
        assert self.core is not None
        items: list[tuple[Window, Lineage]] = []
        for window in windows:
            lineage = self._lineage(window.adapter)
            if lineage.is_empty:
                # A lineage this instance has not seen may have been started since its last
                # assignment (a replay into this name): catch up rather than announce a
                # second v1.
                await self._refresh()
                lineage = self._lineage(window.adapter)
            items.append((window, lineage))
        if len(items) == 1:
            window, lineage = items[0]
            try:
                outcomes: list[Outcome | AdapterHeld] = [
                    await self.core.train_waiting(window, lineage, self._stopping)
                ]
            except AdapterHeld as held:
                outcomes = [held]
        else:
            outcomes = await self.core.train_group_waiting(items, self._stopping)
        done: list[tuple[Window, Lineage, Outcome]] = []
        for (window, lineage), outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, AdapterHeld):
                self._hold(window, outcome)
            else:
                done.append((window, lineage, outcome))
        if not done:
            return
        faults = self.core.faults
        # The crash tests' commit-inside fault fires in the version it names.
        inside = [
            partial(faults.at, "commit-inside", lineage.adapter, lineage.version + 1)
            for _, lineage, _ in done
        ]

        def inside_the_transaction() -> None:
            for fault in inside:
                fault()

        await self.committer.commit(
            [r for _, lineage, o in done for r in announce(o, lineage, self.config.topics)],
            self.windows.committable(settling=[window for window, _, _ in done]),
            inside=inside_the_transaction,
        )
        for window, lineage, outcome in done:
            self.windows.settle(window)  # committed: its held-out events no longer hold offsets
            self._record(window, lineage, outcome)

    def _record(self, window: Window, lineage: Lineage, outcome: Outcome) -> None:
        """``outcome`` is committed: into the lineage, the metrics and the log."""
        if isinstance(outcome, Trained):
            lineage.record(outcome.update)
            self.metrics.windows.inc()
            self.metrics.version.labels(lineage.adapter).set(outcome.update.version)
            self.metrics.loss.labels(lineage.adapter).set(outcome.update.train_loss)
            group = outcome.update.window.group
            log.info(
                "%s v%d: %s (%d events) loss %.4f in %.3fs%s",
                lineage.adapter,
                lineage.version,
                str(window),
                len(window.events),
                outcome.update.train_loss,
                outcome.step_seconds,
                f" (one step with {len(group.adapters) - 1} other adapters)" if group else "",
                extra=at(window.tp, window.last_offset),
            )
        else:
            lineage.record(outcome)
            self.metrics.quarantined.inc()
            self.metrics.adapter_quarantined.labels(lineage.adapter).inc()
            log.error(
                "%s: window %s quarantined after %d tries; the adapter stays at v%d",
                lineage.adapter,
                str(window),
                outcome.tries,
                lineage.version,
                extra=at(window.tp, window.last_offset),
            )

    def _hold(self, window: Window, held: AdapterHeld) -> None:
        """Put ``window``'s adapter on hold: its window waits, uncommitted; the rest go on."""
        self.windows.pin(window)
        self.holds.hold(window, held)

    async def _recheck_holds(self) -> None:
        """When a held adapter checks out again, read the assigned partitions again from
        their committed offsets (the pinned window and the events after it were never
        committed)."""
        assert self.core is not None
        if await self.holds.release(self.core, self.lineages, self.windows):
            await self._rewind()

    async def _commit_offsets(self, force: bool = False, why: str = "") -> None:
        if not self.committer.can_commit:
            return
        try:
            await self.committer.commit_offsets(self.windows.committable(), force=force)
        except (KafkaError, TrainerError) as exc:
            if not force:
                raise
            log.warning("offset commit %s failed (the records will be read again): %r", why, exc)

    def _quarantine_record(
        self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], error: SchemaError
    ) -> None:
        """Stage an unreadable record's quarantine record: it goes out with the next commit,
        so a run of bad records costs one transaction, and no offset passes it unwritten."""
        key = record.key.decode(errors="replace") if record.key is not None else None
        # A key is an adapter name only if it is a valid one: anything else names files.
        adapter = key if key is not None and ADAPTER_NAME.fullmatch(key) else None
        entry = QuarantineRecord.bad_record(
            adapter,
            str(error),
            SourcePosition(topic=tp.topic, partition=tp.partition, offset=record.offset),
            record.value,
        )
        self.windows.mark_read(tp, record.offset)
        self.committer.stage(quarantine(entry, self.config.topics))
        self.history.unreadable[tp] = record.offset
        self.metrics.quarantined.inc()
        self.metrics.adapter_quarantined.labels(adapter or "unknown").inc()
        log.error(
            "unreadable learning event quarantined: %s",
            clip(str(error), 300),
            extra=at(tp, record.offset),
        )
