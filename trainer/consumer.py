"""The trainer: learning-events → LoRA steps → adapter files → adapter-updates, exactly once.

For each full window of one adapter (in offset order) the trainer

1. runs one LoRA step (retried up to ``max_tries`` times when it raises or
   its loss is not finite),
2. writes the version's files atomically and durably (:class:`AdapterStore`),
3. commits, in ONE Kafka transaction, the AdapterUpdate and the consumer
   offsets up to which everything is handled.

A crash before 3 repeats the window (its files are rewritten, its version
is announced once); a crash after 3 cannot lose it. A window that fails
every try goes to the quarantine topic in the same kind of transaction, and
the adapter stays at its last good version. Event ids already in an
adapter's lineage are skipped: the scoring stage delivers at least once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced
from aiokafka.structs import ConsumerRecord

from schemas import (
    AdapterUpdate,
    KafkaPosition,
    LearningEvent,
    LoraSpec,
    SchemaError,
    SourcePosition,
    decode,
    encode,
)
from trainer.config import TrainerConfig
from trainer.exceptions import TrainerError
from trainer.faults import Faults
from trainer.lineage import Lineage, load_lineages
from trainer.lora import AdapterState, LoraStepper, StepResult
from trainer.metrics import TrainerMetrics
from trainer.model import BaseModel, load_base_model, resolve_device
from trainer.quarantine import Quarantined
from trainer.store import AdapterStore, StoredVersion
from trainer.window import Window, Windows

__all__ = ["Trainer"]

log = logging.getLogger(__name__)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
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
            if not (trainer._fenced or trainer._failed):
                try:
                    await trainer._commit_offsets(force=True)
                except (KafkaError, TrainerError) as exc:
                    log.warning("offset commit on revocation failed (records are re-read): %r", exc)
            trainer.windows.drop(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        # An exception here would only be logged by aiokafka's coordinator; the loop re-raises it.
        try:
            await self.trainer.resume()
        except Exception as exc:
            self.trainer._resume_error = exc
            self.trainer._ready.set()


class Trainer:
    """One trainer instance; ``async with Trainer(config) as t: await t.run()``."""

    def __init__(self, config: TrainerConfig, metrics: TrainerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or TrainerMetrics()
        self.faults = Faults.parse(config.faults)
        self.windows = Windows(config.window_size)
        self.store = AdapterStore(config.adapter_dir)
        self.lineages: dict[str, Lineage] = {}
        self._states: dict[str, tuple[int, AdapterState]] = {}
        self._stopping = asyncio.Event()
        # aiokafka runs the rebalance listener in its coordinator task, concurrently with
        # getmany(): records can arrive before resume() has read the lineages. Nothing is
        # handled until the lineages for the current assignment are loaded.
        self._ready = asyncio.Event()
        self._resume_error: Exception | None = None
        # Held while a record is handled (a window trains and commits); a revocation waits for it.
        self._busy = asyncio.Lock()
        # A window is taken out of Windows before it trains; if anything fails after
        # that, committing on the way out would move the offsets past it. So a trainer
        # that failed (or was fenced) commits nothing more: the window is read again.
        self._fenced = False
        self._failed = False
        self._last_commit: dict[TopicPartition, int] = {}
        self._last_commit_at = 0.0
        self.base: BaseModel | None = None
        self.stepper: LoraStepper | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None

    # ── lifecycle ────────────────────────────────────────────────────────────

    async def start(self) -> None:
        cfg = self.config
        device = resolve_device(cfg.device)
        self.base = await asyncio.to_thread(
            load_base_model, cfg.base_model, device, cfg.base_model_name
        )
        self.stepper = LoraStepper(self.base, cfg.lora, seed=cfg.seed)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers,
            transactional_id=cfg.transactional_id,
            enable_idempotence=True,
            acks="all",
            **cfg.client_options,
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers,
            group_id=cfg.group_id,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            max_poll_interval_ms=30 * 60 * 1000,
            **cfg.client_options,
        )
        try:
            await self._producer.start()
            await self._consumer.start()
        except KafkaError as exc:
            await self.stop()
            raise TrainerError(f"cannot reach Kafka at {cfg.bootstrap_servers}: {exc!r}") from exc
        self._consumer.subscribe([cfg.topics.learning_events], listener=_Rebalance(self))
        log.info(
            "trainer %s: %s on %s (%s, %s), windows of %d",
            cfg.transactional_id,
            cfg.base_model_name,
            device,
            cfg.topics.learning_events,
            cfg.group_id,
            cfg.window_size,
        )

    async def stop(self) -> None:
        """Stop cleanly: offsets of fully handled records are committed, nothing half-done."""
        clean = not (self._fenced or self._failed)
        if self._consumer is not None and self._producer is not None and clean:
            try:
                await self._commit_offsets(force=True)
            except (KafkaError, TrainerError) as exc:
                log.warning("final offset commit failed (the records will be read again): %r", exc)
        for client in (self._consumer, self._producer):
            if client is not None:
                await client.stop()
        self._consumer = self._producer = None

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
        try:
            await self._run()
        except BaseException:
            self._failed = True
            raise

    async def _run(self) -> None:
        assert self._consumer is not None
        while not self._stopping.is_set():
            batch = await self._consumer.getmany(timeout_ms=500, max_records=256)
            if batch:
                await self._ready.wait()
            if self._resume_error is not None:
                raise self._resume_error
            for tp, records in batch.items():
                for record in records:
                    async with self._busy:
                        if self._stopping.is_set() or tp not in self._consumer.assignment():
                            break  # revoked while this batch waited: the new owner reads it
                        await self._handle(tp, record)
            async with self._busy:
                for window in self.windows.expired(self.config.max_wait_seconds):
                    await self._train(window)
                await self._commit_offsets()

    async def resume(self) -> None:
        """Reload every adapter's lineage from Kafka (on start and on every assignment)."""
        cfg = self.config
        self._ready.clear()
        self.lineages = await load_lineages(
            cfg.bootstrap_servers,
            cfg.topics.adapter_updates,
            cfg.topics.quarantine,
            cfg.client_options,
        )
        for adapter, lineage in self.lineages.items():
            cached = self._states.get(adapter)
            if cached is not None and cached[0] != lineage.version:
                del self._states[adapter]
            self.metrics.version.labels(adapter).set(lineage.version)
        if self.lineages:
            log.info(
                "resumed: %s",
                ", ".join(f"{a} v{lin.version}" for a, lin in sorted(self.lineages.items())),
            )
        self._ready.set()

    async def _handle(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        position = KafkaPosition(tp.topic, tp.partition, record.offset)
        try:
            event = decode(record.value, LearningEvent, position=position)
        except SchemaError as exc:
            await self._quarantine_record(tp, record, exc)
            return
        lineage = self.lineages.setdefault(event.adapter, Lineage(event.adapter))
        if (
            lineage.is_handled(tp, record.offset)
            or event.id in lineage.trained_ids
            or self.windows.holds(tp, event.adapter, event.id)
        ):
            self.metrics.skipped.inc()
            self.windows.mark_read(tp, record.offset)
            return
        window = self.windows.add(tp, record.offset, event)
        self.windows.mark_read(tp, record.offset)
        if window is not None:
            await self._train(window)

    # ── one window ───────────────────────────────────────────────────────────

    async def _state_of(self, lineage: Lineage) -> AdapterState:
        assert self.stepper is not None and self.base is not None
        cached = self._states.get(lineage.adapter)
        if cached is not None and cached[0] == lineage.version:
            return cached[1]
        latest = lineage.latest
        if latest is None:
            state = self.stepper.initial_state()
        else:
            if latest.base_model_fingerprint not in (None, self.base.fingerprint):
                raise TrainerError(
                    f"adapter {lineage.adapter} v{latest.version} was trained on base model "
                    f"{latest.base_model} ({latest.base_model_fingerprint}), but this trainer runs "
                    f"{self.base.name} ({self.base.fingerprint}); set LORASTREAM_BASE_MODEL to its base"
                )
            state = await asyncio.to_thread(
                self.store.read, lineage.adapter, latest.version, latest.sha256
            )
        self._states[lineage.adapter] = (lineage.version, state)
        return state

    def _step(self, state: AdapterState, window: Window, version: int) -> StepResult:
        assert self.stepper is not None
        state = self.faults.poison(state, window.ids)
        result = self.stepper.step(state, window.examples())
        self.faults.at("step", window.adapter, version)
        return result

    async def _train(self, window: Window) -> None:
        lineage = self.lineages.setdefault(window.adapter, Lineage(window.adapter))
        state = await self._state_of(lineage)
        version = lineage.version + 1
        errors: list[str] = []
        result: StepResult | None = None
        for attempt in range(1, self.config.max_tries + 1):
            try:
                with self.metrics.step_seconds.time():
                    result = await asyncio.to_thread(self._step, state, window, version)
                break
            except Exception as exc:  # every failure of a step is retried, then quarantined
                errors.append(f"try {attempt}: {type(exc).__name__}: {exc}")
                self.metrics.step_failures.inc()
                log.warning("%s v%d: step failed (%s)", window.adapter, version, errors[-1])
        if result is None:
            await self._quarantine_window(window, errors)
            return
        stored = await asyncio.to_thread(self._write, window, version, result)
        self.faults.at("commit", window.adapter, version)
        update = AdapterUpdate(
            adapter=window.adapter,
            version=version,
            parent_version=version - 1 if version > 1 else None,
            base_model=self.config.base_model_name,
            base_model_fingerprint=self.base.fingerprint if self.base else None,
            uri=stored.path.resolve().as_uri(),
            sha256=stored.sha256,
            lora=LoraSpec(
                r=self.config.lora.r,
                alpha=self.config.lora.alpha,
                target_modules=list(self.config.lora.target_modules),
                dropout=self.config.lora.dropout,
            ),
            window=window.spec(),
            train_loss=result.loss,
            created_at=datetime.now(tz=UTC),
        )
        await self._send_committed(
            self.config.topics.adapter_updates,
            window.adapter,
            encode(update),
            fault=(window.adapter, version),
        )
        lineage.record_update(update)
        self._states[window.adapter] = (version, result.state)
        self.metrics.windows.inc()
        self.metrics.version.labels(window.adapter).set(version)
        self.metrics.loss.labels(window.adapter).set(result.loss)
        log.info(
            "%s v%d: %s[%d]@%d..%d (%d events) loss %.4f in %.3fs",
            window.adapter,
            version,
            window.tp.topic,
            window.tp.partition,
            window.first_offset,
            window.last_offset,
            len(window.events),
            result.loss,
            result.seconds,
        )

    def _write(self, window: Window, version: int, result: StepResult) -> StoredVersion:
        assert self.stepper is not None
        metadata = {
            "adapter": window.adapter,
            "version": version,
            "base_model": self.config.base_model_name,
            "base_model_fingerprint": self.base.fingerprint if self.base else None,
            "seed": self.config.seed,
            "train_loss": result.loss,
            "tokens": result.tokens,
            "optimizer_steps": result.state.steps,
            "window": window.spec().model_dump(mode="json"),
        }
        return self.store.write(window.adapter, version, result.state, self.stepper, metadata)

    # ── Kafka transactions ───────────────────────────────────────────────────

    async def _transact(
        self,
        record: tuple[str, str | None, bytes] | None,
        offsets: dict[TopicPartition, int],
        fault: tuple[str, int] | None = None,
    ) -> None:
        """Commit ``record`` (topic, adapter, value), if any, and ``offsets`` in one transaction."""
        assert self._producer is not None
        topic = record[0] if record else "the consumer offsets"
        try:
            async with self._producer.transaction():
                if record is not None:
                    topic, adapter, value = record
                    sent = await self._producer.send(
                        topic, key=adapter.encode() if adapter else None, value=value
                    )
                    await sent
                if fault is not None:
                    self.faults.at("commit-inside", *fault)
                if offsets:
                    await self._producer.send_offsets_to_transaction(offsets, self.config.group_id)
        except ProducerFenced as exc:
            self._fenced = True
            raise TrainerError(
                f"another trainer took over transactional id {self.config.transactional_id}; "
                "this one stops (give each instance its own LORASTREAM_INSTANCE_ID)"
            ) from exc
        except KafkaError as exc:
            raise TrainerError(f"the Kafka transaction on {topic} failed: {exc!r}") from exc
        self._last_commit.update(offsets)
        self._last_commit_at = asyncio.get_running_loop().time()

    async def _send_committed(
        self, topic: str, adapter: str | None, value: bytes, fault: tuple[str, int] | None = None
    ) -> None:
        """Send one record and commit every committable offset, in one transaction."""
        await self._transact((topic, adapter, value), self.windows.committable(), fault)

    async def _commit_offsets(self, force: bool = False) -> None:
        """An offsets-only transaction, when offsets moved and a while has passed."""
        offsets = {
            tp: o for tp, o in self.windows.committable().items() if self._last_commit.get(tp) != o
        }
        now = asyncio.get_running_loop().time()
        if offsets and (force or now - self._last_commit_at >= self.config.idle_commit_seconds):
            await self._transact(None, offsets)

    async def _quarantine_window(self, window: Window, errors: list[str]) -> None:
        entry = Quarantined(
            adapter=window.adapter,
            error="; ".join(errors),
            tries=len(errors),
            window=window.spec(),
            events=[pending.event for pending in window.events],
        )
        await self._send_committed(
            self.config.topics.quarantine, window.adapter, entry.model_dump_json().encode()
        )
        self.lineages[window.adapter].record_quarantine(
            window.tp.topic, window.tp.partition, window.last_offset
        )
        self.metrics.quarantined.inc()
        log.error(
            "%s: window %s[%d]@%d..%d quarantined after %d tries; the adapter stays at v%d",
            window.adapter,
            window.tp.topic,
            window.tp.partition,
            window.first_offset,
            window.last_offset,
            len(errors),
            self.lineages[window.adapter].version,
        )

    async def _quarantine_record(
        self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], error: SchemaError
    ) -> None:
        adapter = record.key.decode(errors="replace") if record.key else None
        entry = Quarantined.bad_record(
            adapter,
            str(error),
            SourcePosition(topic=tp.topic, partition=tp.partition, offset=record.offset),
            record.value,
        )
        self.windows.mark_read(tp, record.offset)
        await self._send_committed(
            self.config.topics.quarantine, adapter, entry.model_dump_json().encode()
        )
        self.metrics.quarantined.inc()
        log.error("unreadable learning event quarantined: %s", error)
