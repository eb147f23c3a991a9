"""Training one window, with no Kafka in it: the core that the live trainer and replay share.

:meth:`WindowTrainer.train` takes a closed :class:`~trainer.window.Window`
and the :class:`~trainer.lineage.Lineage` it extends, and returns either a
:class:`Trained` (the step succeeded, the version's files are durable, the
AdapterUpdate is ready to announce) or a :class:`~schemas.QuarantineRecord`
(every try failed). It never commits anything and never changes the lineage:
the driver hands the outcome to the :class:`~trainer.committer.Committer`,
which announces it in its Kafka transaction, then records it in the lineage
(:meth:`~trainer.lineage.Lineage.record`). A driver that crashes in between
repeats the window, and the core rewrites the same files.

The core only asks the lineage: the states it keeps in memory are keyed by
the version they follow, so a lineage that moved on (by a commit, or by what
other instances committed) is read afresh, never stepped on from a stale state.

The version is named after the lineage, not after the events: a replay
trains ``tutor``'s events into the lineage ``tutor-v2``.

Nothing is trusted unchecked. Before a lineage's newest version is stepped
on, every one of its files is checked against the announcement's manifest,
and its LoRA settings (rank, alpha, targets, dropout: the lineage's, fixed by
its first version) against this trainer's. Either fault raises
:class:`~trainer.exceptions.AdapterHeld` for that adapter alone: the driver
holds it, and the other adapters go on.

With an evaluation fraction, each version is also measured on its adapter's
evaluation set (:mod:`trainer.evaluation`) after its step: the new weights'
and the base model's mean response-token loss go into the AdapterUpdate's
``eval`` and the version's metadata, the whole set's and each segment's (the
forgetting matrix's columns). With a general set (``TrainingConfig.general_eval``),
each version is also measured on it beside the base model (``general_eval``). The
evaluations read the new state and change nothing a step reads, so the weights are
the same with or without them.

With rehearsal (``TrainingConfig.rehearsal`` = k > 0), each step's batch is
the window's events followed by k earlier trained events of the adapter,
sampled from the parent version's rehearsal buffer (:mod:`trainer.rehearsal`);
the window's trained events then join the buffer, which is written with the
version as ``rehearsal.jsonl`` and announced as ``rehearsal`` (how many, and a
digest of which). Off, nothing of it is read, written or announced.

Many adapters' windows (``TrainingConfig.adapters_per_step`` > 1) go through
:meth:`WindowTrainer.train_group`: one forward and backward for up to that
many (:mod:`trainer.grouped`), each its own version, files and outcome. The
window's announcement records the group (``window.group``: the adapters, and
each one's rows as token counts); a window whose grouped step failed is tried
again alone, and quarantined alone if those tries fail too. A replay passes the
recorded group to :meth:`WindowTrainer.train`, which steps the window with
stand-ins of that shape in the other adapters' places: bit for bit the step it
took in the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

import orjson
from pydantic import ValidationError

from schemas import (
    AdapterUpdate,
    LoraSpec,
    QuarantineRecord,
    StepGroup,
    WindowSpec,
)
from trainer.batching import tokenize
from trainer.config import TrainingConfig
from trainer.evaluation import (
    EvalExample,
    decode_eval_set,
    encode_eval_set,
)
from trainer.exceptions import (
    AdapterHeld,
    AdapterStoreError,
    ResourceError,
    StepError,
    TrainerError,
)
from trainer.faults import Faults
from trainer.grouped import GroupedStepper, Member, plan_groups, stand_in
from trainer.hold_reasons import settings_differ
from trainer.lineage import Lineage
from trainer.lora import AdapterState, LoraStepper, StepResult
from trainer.measure import Evaluation, Measure
from trainer.metrics import TrainerMetrics
from trainer.model import BaseModel, load_base_model, resolve_device
from trainer.rehearsal import Buffer, Plan, Rehearsed, decode_buffer, encode_buffer, plan
from trainer.store import (
    EVAL_SET_FILE,
    METADATA_FILE,
    REHEARSAL_FILE,
    AdapterStore,
    StoredVersion,
)
from trainer.window import Window

__all__ = [
    "Outcome",
    "Trained",
    "WindowTrainer",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
# The wait for a resource says so under the name it has always had in the trainer's log.
_resource_log = logging.getLogger("trainer.committer")


@dataclass(frozen=True)
class Trained:
    """A window that trained: its announcement, and the state it leaves the adapter in."""

    update: AdapterUpdate
    state: AdapterState
    step_seconds: float
    tries: int
    eval_set: list[EvalExample] = field(default_factory=list)
    eval_seconds: float | None = None  # None: evaluation is off


Outcome = Trained | QuarantineRecord


@dataclass(frozen=True)
class _Prepared:
    """What a window's step starts from: the parent's state, the version it makes, the
    rehearsal it mixes in, the evaluation set it carries on."""

    state: AdapterState
    version: int
    rehearsal: Plan | None
    examples: list[tuple[str, str]]
    previous_eval: list[EvalExample]


class WindowTrainer:
    """The base model, the LoRA stepper and the adapter store; trains any lineage's windows.

    Synchronous and CPU/GPU-bound: async drivers call it in a worker thread.
    """

    def __init__(
        self,
        config: TrainingConfig,
        base: BaseModel,
        metrics: TrainerMetrics | None = None,
    ) -> None:
        self.config = config
        self.base = base
        self.metrics = metrics or TrainerMetrics()
        self.faults = Faults.parse(config.faults)
        self.stepper = LoraStepper(base, config.lora, seed=config.seed)
        self.store = AdapterStore(
            config.adapter_dir, before_write=self.faults.disk, cache=config.cache_dir
        )
        self._states: dict[str, tuple[int, AdapterState]] = {}
        self._eval_sets: dict[str, tuple[int, list[EvalExample]]] = {}
        self._rehearsals: dict[str, tuple[int, Buffer]] = {}
        self.measure = Measure(config, self.stepper)
        self._grouped: GroupedStepper | None = None

    @property
    def grouped(self) -> GroupedStepper:
        """The stepper of groups, on this trainer's model (made on first use)."""
        if self._grouped is None:
            self._grouped = GroupedStepper(self.stepper)
        return self._grouped

    @classmethod
    def load(cls, config: TrainingConfig, metrics: TrainerMetrics | None = None) -> WindowTrainer:
        """Load the base model (a :class:`~trainer.exceptions.BaseModelError` names it)."""
        device = resolve_device(config.device)
        base = load_base_model(config.base_model, device, config.base_model_name)
        return cls(config, base, metrics)

    @property
    def lora_spec(self) -> LoraSpec:
        lora = self.config.lora
        return LoraSpec(
            r=lora.r,
            alpha=lora.alpha,
            target_modules=list(lora.target_modules),
            dropout=lora.dropout,
        )

    # ── the state a lineage continues from ───────────────────────────────────

    def state_of(self, lineage: Lineage) -> AdapterState:
        """The adapter state after ``lineage``'s newest version (initial for a new lineage),
        its files verified first; :class:`AdapterHeld` when they or its settings are wrong."""
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
                    f"{latest.base_model} ({latest.base_model_fingerprint}), but this one is "
                    f"{self.base.name} ({self.base.fingerprint}); run with that base model "
                    "(--base-model or LORASTREAM_BASE_MODEL)"
                )
            differs = settings_differ(latest.lora, self.lora_spec)
            if differs is not None:
                raise AdapterHeld(lineage.adapter, differs)
            try:
                state = self.store.read(
                    lineage.adapter, latest.version, latest.sha256, latest.manifest_sha256
                )
            except AdapterStoreError as exc:
                raise AdapterHeld(lineage.adapter, str(exc)) from exc
        self._states[lineage.adapter] = (lineage.version, state)
        return state

    def eval_set_of(self, lineage: Lineage) -> list[EvalExample]:
        """The evaluation set of ``lineage``'s newest version (empty for a new lineage, or
        for a version written while evaluation was off)."""
        cached = self._eval_sets.get(lineage.adapter)
        if cached is not None and cached[0] == lineage.version:
            return cached[1]
        latest = lineage.latest
        examples: list[EvalExample] = []
        if latest is not None:
            data = self.store.read_optional(lineage.adapter, latest.version, EVAL_SET_FILE)
            if data is not None:
                where = str(self.store.version_dir(lineage.adapter, latest.version) / EVAL_SET_FILE)
                examples = decode_eval_set(data, where)
        self._eval_sets[lineage.adapter] = (lineage.version, examples)
        return examples

    def rehearsal_of(self, lineage: Lineage) -> Buffer:
        """The rehearsal buffer of ``lineage``'s newest version (empty for a new lineage, or
        for a version written while rehearsal was off: the buffer starts there)."""
        cached = self._rehearsals.get(lineage.adapter)
        if cached is not None and cached[0] == lineage.version:
            return cached[1]
        latest = lineage.latest
        buffer = Buffer()
        if latest is not None:
            data = self.store.read_optional(lineage.adapter, latest.version, REHEARSAL_FILE)
            if data is not None:
                where = self.store.version_dir(lineage.adapter, latest.version) / REHEARSAL_FILE
                buffer = decode_buffer(data, str(where))
        self._rehearsals[lineage.adapter] = (lineage.version, buffer)
        return buffer

    def _rehearsal(self, window: Window, lineage: Lineage) -> Plan | None:
        """What version ``lineage.version + 1`` rehearses (a sample of its parent's buffer)
        and the buffer it leaves (the parent's, offered the window's trained events);
        None while rehearsal is off. A function of the seed, the version number and the
        lineage's event ids only: never of the adapter's name, so a replay draws the same."""
        if not self.config.rehearses:
            return None
        trained = (Rehearsed(p.event.id, p.event.prompt, p.event.response) for p in window.events)
        config = self.config
        return plan(
            self.rehearsal_of(lineage),
            lineage.version + 1,
            trained,
            config.rehearsal,
            config.rehearsal_buffer,
            config.seed,
        )

    def forget(self, lineages: dict[str, Lineage]) -> None:
        """Free the cached states that no longer match ``lineages`` (read again from Kafka):
        those of adapters gone elsewhere, or moved on meanwhile. Only memory: a state is
        never used for a version other than its own."""
        for cache in (self._states, self._eval_sets, self._rehearsals):
            for adapter in list(cache):
                lineage = lineages.get(adapter)
                if lineage is None or lineage.version != cache[adapter][0]:
                    del cache[adapter]

    # ── one window ───────────────────────────────────────────────────────────

    async def train_waiting(
        self,
        window: Window,
        lineage: Lineage,
        stopping: asyncio.Event | None = None,
        group: StepGroup | None = None,
    ) -> Outcome:
        """:meth:`train` in a worker thread, as both drivers call it.

        A resource that ran out (a full disk …) is not the window's fault: it is waited for,
        with one line per try and a backoff up to a minute, until it is back or ``stopping``.
        """
        return await self._waiting(lambda: self.train(window, lineage, group), stopping)

    async def train_group_waiting(
        self, items: list[tuple[Window, Lineage]], stopping: asyncio.Event | None = None
    ) -> list[Outcome | AdapterHeld]:
        """:meth:`train_group` in a worker thread, waiting out a resource as
        :meth:`train_waiting` does."""
        return await self._waiting(lambda: self.train_group(items), stopping)

    async def _waiting(self, work: Callable[[], _T], stopping: asyncio.Event | None) -> _T:
        delay = 1.0
        while True:
            try:
                return await asyncio.to_thread(work)
            except ResourceError as exc:
                if stopping is not None and stopping.is_set():
                    raise
                _resource_log.error("%s; trying again in %.0fs", exc, delay)
                if stopping is None:
                    await asyncio.sleep(delay)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), delay)
                delay = min(delay * 2, 60.0)

    def train(self, window: Window, lineage: Lineage, group: StepGroup | None = None) -> Outcome:
        """Train ``window`` as the next version of ``lineage``; files durable, nothing
        announced, the lineage unchanged (the driver records the outcome once committed).

        With ``group`` (a replay's: the group the window was stepped in, named as
        ``lineage``), the window is stepped with stand-ins of the group's shape in the
        other adapters' places, so that its step is the group's bit for bit; should its
        own rows not have the recorded shape (another tokenizer or max_length), alone.
        """
        prepared = self._prepare(window, lineage)
        if group is None:
            group = self._as_written(window, lineage.adapter, prepared.version)[1]
        return self._train(window, lineage, prepared, group)

    def _as_written(
        self, window: Window, adapter: str, version: int
    ) -> tuple[bool, StepGroup | None]:
        """Whether ``window`` already wrote ``version`` here (its writer died before the
        commit, or the commit failed), and the group it was stepped in then (None: alone).
        Such a window is stepped again as it was, so that it writes the same files: grouped
        otherwise, it would write others, and the version, written once, would stop it."""
        path = self.store.version_dir(adapter, version) / METADATA_FILE
        try:
            spec = WindowSpec.model_validate(orjson.loads(path.read_bytes())["window"])
        except (OSError, ValueError, KeyError, TypeError, ValidationError):
            return False, None
        if spec.event_ids != window.ids:
            return False, None
        return True, spec.group

    def train_group(self, items: list[tuple[Window, Lineage]]) -> list[Outcome | AdapterHeld]:
        """Train each ``(window, lineage)`` as :meth:`train` would, up to
        ``adapters_per_step`` windows in one forward and backward: per item, in order, its
        outcome, or the :class:`AdapterHeld` that holds its adapter alone.

        The adapters must differ. A window whose grouped step failed is tried again
        alone, for the tries left; its version, if it makes one, records no group.
        """
        if len({lineage.adapter for _, lineage in items}) != len(items):
            raise ValueError("a group steps each adapter's window once")
        out: list[Outcome | AdapterHeld | None] = [None] * len(items)
        ready: list[tuple[int, _Prepared]] = []
        for i, (window, lineage) in enumerate(items):
            try:
                ready.append((i, self._prepare(window, lineage)))
            except AdapterHeld as held:
                out[i] = held
        fresh: list[tuple[int, _Prepared]] = []
        for i, prepared in ready:
            window, lineage = items[i]
            written, recorded = self._as_written(window, lineage.adapter, prepared.version)
            if written:  # stepped as it was before the crash, not in this group
                out[i] = self._held_or(partial(self._train, window, lineage, prepared, recorded))
            else:
                fresh.append((i, prepared))
        ready = fresh
        lora = self.config.lora
        for chosen in plan_groups([lora] * len(ready), self.config.adapters_per_step):
            group = [ready[c] for c in chosen]
            if len(group) == 1:
                i, prepared = group[0]
                out[i] = self._held_or(partial(self._train, *items[i], prepared))
                continue
            members = [
                Member(self.faults.poison(p.state, items[i][0].ids), p.examples, lora)
                for i, p in group
            ]
            try:
                with self.metrics.step_seconds.time():
                    results: list[object] = list(self.grouped.step(members))
            except Exception as exc:  # the whole group's: each window tries again alone
                results = [exc] * len(group)
            shape = StepGroup(
                adapters=[items[i][1].adapter for i, _ in group], rows=self.grouped.rows
            )
            for (i, prepared), result in zip(group, results, strict=True):
                window, lineage = items[i]
                out[i] = self._held_or(
                    partial(self._after_group, window, lineage, prepared, result, shape)
                )
        return [o for o in out if o is not None]

    def _after_group(
        self,
        window: Window,
        lineage: Lineage,
        prepared: _Prepared,
        result: object,
        shape: StepGroup,
    ) -> Outcome:
        if isinstance(result, StepResult):
            try:
                self.faults.at("step", lineage.adapter, prepared.version)
            except Exception as exc:
                result = exc
            else:
                return self._finish(window, lineage, prepared, result, 1, shape)
        assert isinstance(result, Exception)
        error = self._failed(lineage.adapter, prepared.version, 1, result)
        return self._train(window, lineage, prepared, None, [error])

    @staticmethod
    def _held_or(work: Callable[[], Outcome]) -> Outcome | AdapterHeld:
        try:
            return work()
        except AdapterHeld as held:
            return held

    def _prepare(self, window: Window, lineage: Lineage) -> _Prepared:
        state = self.state_of(lineage)
        previous_eval = self.eval_set_of(lineage) if self.config.evaluates else []
        try:
            rehearsal = self._rehearsal(window, lineage)
        except AdapterStoreError as exc:  # the parent's rehearsal.jsonl is missing or bad
            raise AdapterHeld(lineage.adapter, str(exc)) from exc
        rehearsed = rehearsal.examples if rehearsal is not None else []
        return _Prepared(
            state, lineage.version + 1, rehearsal, window.examples() + rehearsed, previous_eval
        )

    def _failed(self, adapter: str, version: int, attempt: int, exc: BaseException) -> str:
        error = f"try {attempt}: {type(exc).__name__}: {exc}"
        self.metrics.step_failures.inc()
        log.warning("%s v%d: step failed (%s)", adapter, version, error)
        return error

    def _train(
        self,
        window: Window,
        lineage: Lineage,
        prepared: _Prepared,
        group: StepGroup | None = None,
        errors: list[str] | None = None,
    ) -> Outcome:
        errors = list(errors or [])
        version = prepared.version
        if group is not None and not self._fits(group, lineage.adapter, prepared.examples):
            log.info(
                "%s v%d: its rows are not those of the group it was stepped in (another "
                "tokenizer or max_length?): stepped alone",
                lineage.adapter,
                version,
            )
            group = None
        for attempt in range(len(errors) + 1, self.config.max_tries + 1):
            try:
                with self.metrics.step_seconds.time():
                    if group is None:
                        result = self._step(prepared, window, lineage.adapter)
                    else:
                        result = self._step_as_in(group, prepared, window, lineage.adapter)
            except Exception as exc:  # every failure of a step is retried, then quarantined
                errors.append(self._failed(lineage.adapter, version, attempt, exc))
                group = None  # tried again alone, as the live trainer does
                continue
            return self._finish(window, lineage, prepared, result, attempt, group)
        return QuarantineRecord(
            adapter=lineage.adapter,
            error="; ".join(errors),
            tries=len(errors),
            window=window.spec(),
            events=[pending.event for pending in window.events],
        )

    def _finish(
        self,
        window: Window,
        lineage: Lineage,
        prepared: _Prepared,
        result: StepResult,
        attempt: int,
        group: StepGroup | None,
    ) -> Trained:
        """Evaluate, write and describe the version a successful step made."""
        version, rehearsal = prepared.version, prepared.rehearsal
        spec = window.spec()
        if group is not None:
            spec = spec.model_copy(update={"group": group})
        evaluation = self.measure.version(
            window, prepared.previous_eval, result, lineage.adapter, version
        )
        try:
            stored = self._write(spec, lineage.adapter, version, result, evaluation, rehearsal)
        except AdapterStoreError as exc:  # v<version> exists with other files
            raise AdapterHeld(lineage.adapter, str(exc)) from exc
        self.faults.at("commit", lineage.adapter, version)
        update = self._update(spec, version, stored, result, evaluation, rehearsal)
        # Kept under the version it becomes: once the driver records the update, the
        # next window steps on from it; until then (or if the commit fails) it is unused.
        self._states[lineage.adapter] = (version, result.state)
        if rehearsal is not None:
            self._rehearsals[lineage.adapter] = (version, rehearsal.buffer)
        if evaluation is None:
            return Trained(update, result.state, result.seconds, attempt)
        self._eval_sets[lineage.adapter] = (version, evaluation.examples)
        return Trained(
            update,
            result.state,
            result.seconds,
            attempt,
            evaluation.examples,
            evaluation.seconds,
        )

    def _fits(self, group: StepGroup, adapter: str, examples: list[tuple[str, str]]) -> bool:
        """Whether ``adapter``'s rows are those ``group`` recorded for it."""
        if adapter not in group.adapters:
            return False
        rows = tokenize(self.base.tokenizer, examples, self.config.lora.max_length)
        mine = [(len(p), len(r)) for p, r in rows]
        return mine == [tuple(row) for row in group.rows[group.adapters.index(adapter)]]

    def _step_as_in(
        self, group: StepGroup, prepared: _Prepared, window: Window, adapter: str
    ) -> StepResult:
        """The window's step in ``group``'s batch, stand-ins in the other adapters' places."""
        lora = self.config.lora
        own = group.adapters.index(adapter)
        members = [
            Member(self.faults.poison(prepared.state, window.ids), prepared.examples, lora)
            if k == own
            else stand_in(rows, lora)
            for k, rows in enumerate(group.rows)
        ]
        result = self.grouped.step(members)[own]
        if not isinstance(result, StepResult):
            raise result if isinstance(result, Exception) else StepError("no result")
        self.faults.at("step", adapter, prepared.version)
        return result

    def _step(self, prepared: _Prepared, window: Window, adapter: str) -> StepResult:
        """The step on the window's examples, then the rehearsed ones, as one batch (each
        of ``steps_per_window`` steps uses it all). Its loss, the version's ``train_loss``,
        is the first step's mean over that whole batch: the window's alone without rehearsal."""
        state = self.faults.poison(prepared.state, window.ids)
        result = self.stepper.step(state, prepared.examples)
        self.faults.at("step", adapter, prepared.version)
        return result

    def _write(
        self,
        spec: WindowSpec,
        adapter: str,
        version: int,
        result: StepResult,
        evaluation: Evaluation | None,
        rehearsal: Plan | None = None,
    ) -> StoredVersion:
        metadata = {
            "adapter": adapter,
            "version": version,
            "base_model": self.config.base_model_name,
            "base_model_fingerprint": self.base.fingerprint,
            "seed": self.config.seed,
            "learning_rate": self.config.lora.learning_rate,
            "steps_per_window": self.config.lora.steps_per_window,
            "train_loss": result.loss,
            "tokens": result.tokens,
            "optimizer_steps": result.state.steps,
            "window": spec.model_dump(
                mode="json", exclude={"group"} if spec.group is None else None
            ),
        }
        files: dict[str, bytes] = {}
        if rehearsal is not None:
            metadata["rehearsal"] = self.config.rehearsal
            metadata["rehearsal_buffer"] = self.config.rehearsal_buffer
            files[REHEARSAL_FILE] = encode_buffer(rehearsal.buffer)
        if evaluation is None:
            return self.store.write(
                adapter, version, result.state, self.stepper, metadata, files or None
            )
        if self.config.evaluates:
            measured = evaluation.spec
            metadata["eval"] = measured.model_dump(mode="json") if measured is not None else None
            metadata["eval_fraction"] = self.config.eval_fraction
            metadata["eval_size"] = self.config.eval_size
            metadata["eval_segment_windows"] = self.config.eval_segment_windows
            files[EVAL_SET_FILE] = encode_eval_set(evaluation.examples)
        if self.config.general_eval is not None:
            general = evaluation.general
            metadata["general_eval"] = general.model_dump(mode="json") if general else None
        return self.store.write(
            adapter, version, result.state, self.stepper, metadata, files or None
        )

    def _update(
        self,
        spec: WindowSpec,
        version: int,
        stored: StoredVersion,
        result: StepResult,
        evaluation: Evaluation | None,
        rehearsal: Plan | None = None,
    ) -> AdapterUpdate:
        return AdapterUpdate(
            adapter=stored.adapter,
            version=version,
            parent_version=version - 1 if version > 1 else None,
            base_model=self.config.base_model_name,
            base_model_fingerprint=self.base.fingerprint,
            uri=stored.uri,
            sha256=stored.sha256,
            manifest_sha256=stored.manifest_sha256,
            lora=self.lora_spec,
            window=spec,
            train_loss=result.loss,
            created_at=datetime.now(tz=UTC),
            eval=evaluation.spec if evaluation is not None else None,
            general_eval=evaluation.general if evaluation is not None else None,
            rehearsal=rehearsal.spec if rehearsal is not None else None,
        )
