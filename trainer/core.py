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
``eval`` and the version's metadata. The evaluation reads the new state and
changes nothing a step reads, so the weights are the same with or without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from schemas import AdapterUpdate, EvalSpec, LoraSpec, QuarantineRecord
from trainer.config import TrainingConfig
from trainer.evaluation import EvalExample, decode_eval_set, encode_eval_set, extend_eval_set
from trainer.exceptions import AdapterHeld, AdapterStoreError, ResourceError, TrainerError
from trainer.faults import Faults
from trainer.hold_reasons import settings_differ
from trainer.lineage import Lineage
from trainer.lora import AdapterState, LoraStepper, StepResult
from trainer.metrics import TrainerMetrics
from trainer.model import BaseModel, load_base_model, resolve_device
from trainer.store import EVAL_SET_FILE, AdapterStore, StoredVersion
from trainer.window import Window

__all__ = [
    "Outcome",
    "Trained",
    "WindowTrainer",
]

log = logging.getLogger(__name__)
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

    def forget(self, lineages: dict[str, Lineage]) -> None:
        """Free the cached states that no longer match ``lineages`` (read again from Kafka):
        those of adapters gone elsewhere, or moved on meanwhile. Only memory: a state is
        never used for a version other than its own."""
        for cache in (self._states, self._eval_sets):
            for adapter in list(cache):
                lineage = lineages.get(adapter)
                if lineage is None or lineage.version != cache[adapter][0]:
                    del cache[adapter]

    # ── one window ───────────────────────────────────────────────────────────

    async def train_waiting(
        self, window: Window, lineage: Lineage, stopping: asyncio.Event | None = None
    ) -> Outcome:
        """:meth:`train` in a worker thread, as both drivers call it.

        A resource that ran out (a full disk …) is not the window's fault: it is waited for,
        with one line per try and a backoff up to a minute, until it is back or ``stopping``.
        """
        delay = 1.0
        while True:
            try:
                return await asyncio.to_thread(self.train, window, lineage)
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

    def train(self, window: Window, lineage: Lineage) -> Outcome:
        """Train ``window`` as the next version of ``lineage``; files durable, nothing
        announced, the lineage unchanged (the driver records the outcome once committed)."""
        state = self.state_of(lineage)
        previous_eval = self.eval_set_of(lineage) if self.config.evaluates else []
        version = lineage.version + 1
        errors: list[str] = []
        for attempt in range(1, self.config.max_tries + 1):
            try:
                with self.metrics.step_seconds.time():
                    result = self._step(state, window, lineage.adapter, version)
            except Exception as exc:  # every failure of a step is retried, then quarantined
                errors.append(f"try {attempt}: {type(exc).__name__}: {exc}")
                self.metrics.step_failures.inc()
                log.warning("%s v%d: step failed (%s)", lineage.adapter, version, errors[-1])
                continue
            evaluation = self._evaluation(window, previous_eval, result, lineage.adapter, version)
            try:
                stored = self._write(window, lineage.adapter, version, result, evaluation)
            except AdapterStoreError as exc:  # v<version> exists with other files
                raise AdapterHeld(lineage.adapter, str(exc)) from exc
            self.faults.at("commit", lineage.adapter, version)
            update = self._update(window, version, stored, result, evaluation)
            # Kept under the version it becomes: once the driver records the update, the
            # next window steps on from it; until then (or if the commit fails) it is unused.
            self._states[lineage.adapter] = (version, result.state)
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
        return QuarantineRecord(
            adapter=lineage.adapter,
            error="; ".join(errors),
            tries=len(errors),
            window=window.spec(),
            events=[pending.event for pending in window.events],
        )

    def _evaluation(
        self,
        window: Window,
        previous: list[EvalExample],
        result: StepResult,
        adapter: str,
        version: int,
    ) -> _Evaluation | None:
        """The new version's evaluation set (``previous`` plus the window's held-out
        events) and its measure on it; None while evaluation is off."""
        if not self.config.evaluates:
            return None
        eval_set = extend_eval_set(
            previous,
            (EvalExample.of(window.tp.topic, window.tp.partition, p) for p in window.held_out),
            self.config.eval_size,
        )
        spec, seconds = self._evaluate(result.state, eval_set, adapter, version)
        return _Evaluation(eval_set, spec, seconds)

    def _step(self, state: AdapterState, window: Window, adapter: str, version: int) -> StepResult:
        state = self.faults.poison(state, window.ids)
        result = self.stepper.step(state, window.examples())
        self.faults.at("step", adapter, version)
        return result

    def _evaluate(
        self, state: AdapterState, eval_set: list[EvalExample], adapter: str, version: int
    ) -> tuple[EvalSpec | None, float]:
        """The version's ``eval`` (None for an empty set, or one that cannot be measured:
        an evaluation never costs a window its version) and the seconds it took."""
        started = time.perf_counter()
        if not eval_set:
            return None, 0.0
        try:
            new = [i for i, e in enumerate(eval_set) if e.base_loss_sum is None]
            measured = self.stepper.losses(
                None, [(eval_set[i].prompt, eval_set[i].response) for i in new]
            )
            for i, (total, tokens) in zip(new, measured, strict=True):
                eval_set[i] = replace(eval_set[i], base_loss_sum=total, tokens=tokens)
            sums = self.stepper.losses(state, [(e.prompt, e.response) for e in eval_set])
            count = sum(tokens for _, tokens in sums)
            spec = EvalSpec(
                loss=sum(total for total, _ in sums) / count,
                base_loss=sum(e.base_loss_sum or 0.0 for e in eval_set) / count,
                events=len(eval_set),
            )
        except Exception as exc:
            log.warning("%s v%d: evaluation failed, eval is null (%r)", adapter, version, exc)
            spec = None
        seconds = time.perf_counter() - started
        log.info(
            "%s v%d: evaluated on %d held-out events in %.1f ms",
            adapter,
            version,
            len(eval_set),
            seconds * 1000,
        )
        return spec, seconds

    def _write(
        self,
        window: Window,
        adapter: str,
        version: int,
        result: StepResult,
        evaluation: _Evaluation | None,
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
            "window": window.spec().model_dump(mode="json"),
        }
        if evaluation is None:
            return self.store.write(adapter, version, result.state, self.stepper, metadata)
        spec = evaluation.spec
        metadata["eval"] = spec.model_dump(mode="json") if spec is not None else None
        metadata["eval_fraction"] = self.config.eval_fraction
        metadata["eval_size"] = self.config.eval_size
        files = {EVAL_SET_FILE: encode_eval_set(evaluation.examples)}
        return self.store.write(adapter, version, result.state, self.stepper, metadata, files)

    def _update(
        self,
        window: Window,
        version: int,
        stored: StoredVersion,
        result: StepResult,
        evaluation: _Evaluation | None,
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
            window=window.spec(),
            train_loss=result.loss,
            created_at=datetime.now(tz=UTC),
            eval=evaluation.spec if evaluation is not None else None,
        )


@dataclass(frozen=True)
class _Evaluation:
    """A version's evaluation set, its measure on it, and how long measuring took."""

    examples: list[EvalExample]
    spec: EvalSpec | None
    seconds: float
