"""Training one window, with no Kafka in it: the core that the live trainer and replay share.

:meth:`WindowTrainer.train` takes a closed :class:`~trainer.window.Window`
and the :class:`~trainer.lineage.Lineage` it extends, and returns either a
:class:`Trained` (the step succeeded, the version's files are durable, the
AdapterUpdate is ready to announce) or a :class:`~schemas.QuarantineRecord`
(every try failed). It never commits anything: the driver announces the
outcome in its Kafka transaction, then calls :meth:`WindowTrainer.committed`
so that the lineage and the cached state move on. A driver that crashes in
between repeats the window, and the core rewrites the same files.

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

import logging
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from schemas import AdapterUpdate, EvalSpec, LoraSpec, QuarantineRecord
from trainer.evaluation import EvalExample, decode_eval_set, encode_eval_set, extend_eval_set
from trainer.exceptions import AdapterHeld, AdapterStoreError, TrainerError
from trainer.faults import Faults
from trainer.lineage import Lineage
from trainer.lora import AdapterState, LoraSettings, LoraStepper, StepResult
from trainer.metrics import TrainerMetrics
from trainer.model import BaseModel, load_base_model, resolve_device
from trainer.store import EVAL_SET_FILE, AdapterStore, StoredVersion
from trainer.window import Window

__all__ = [
    "Outcome",
    "Trained",
    "TrainingConfig",
    "WindowTrainer",
    "hold_reason",
    "settings_differ",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingConfig:
    """What training a window needs, whichever driver runs it."""

    adapter_dir: Path | str  # a directory, or an object store's URL (s3://bucket/prefix)
    base_model: Path
    base_model_name: str
    window_size: int = 16
    max_tries: int = 3
    seed: int = 0
    device: str = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)
    faults: str | None = None
    # Off unless asked for (the settings ask for 0.1): with 0, windows, files and
    # announcements are exactly those of a trainer without evaluation.
    eval_fraction: float = 0.0
    eval_size: int = 256
    # Where versions on an object store are kept locally (written, and fetched to resume).
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise ValueError(
                f"TrainingConfig.window_size must be at least 1, not {self.window_size}"
            )
        if self.max_tries < 1:
            raise ValueError(f"TrainingConfig.max_tries must be at least 1, not {self.max_tries}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(
                f"TrainingConfig.eval_fraction must be in [0, 1), not {self.eval_fraction}"
            )
        if self.eval_size < 1:
            raise ValueError(f"TrainingConfig.eval_size must be at least 1, not {self.eval_size}")

    @property
    def evaluates(self) -> bool:
        return self.eval_fraction > 0


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
        """Drop cached states that no longer match the lineages (read again from Kafka)."""
        for cache in (self._states, self._eval_sets):
            for adapter in list(cache):
                lineage = lineages.get(adapter)
                if lineage is None or lineage.version != cache[adapter][0]:
                    del cache[adapter]

    # ── one window ───────────────────────────────────────────────────────────

    def train(self, window: Window, lineage: Lineage) -> Outcome:
        """Train ``window`` as the next version of ``lineage``; files durable, nothing announced."""
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
            if self.config.evaluates:
                eval_set = extend_eval_set(
                    previous_eval,
                    (
                        EvalExample.of(window.tp.topic, window.tp.partition, p)
                        for p in window.held_out
                    ),
                    self.config.eval_size,
                )
                spec, seconds = self._evaluate(result.state, eval_set, lineage.adapter, version)
                evaluation: _Evaluation | None = _Evaluation(eval_set, spec, seconds)
            else:
                evaluation = None
            try:
                stored = self._write(window, lineage.adapter, version, result, evaluation)
            except AdapterStoreError as exc:  # v<version> exists with other files
                raise AdapterHeld(lineage.adapter, str(exc)) from exc
            self.faults.at("commit", lineage.adapter, version)
            update = self._update(window, version, stored, result, evaluation)
            if evaluation is None:
                return Trained(update, result.state, result.seconds, attempt)
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

    def committed(self, lineage: Lineage, outcome: Outcome) -> None:
        """The driver announced ``outcome``: the lineage and the cached state move on."""
        if isinstance(outcome, Trained):
            lineage.record_update(outcome.update)
            self._states[lineage.adapter] = (outcome.update.version, outcome.state)
            if outcome.eval_seconds is not None:
                self._eval_sets[lineage.adapter] = (outcome.update.version, outcome.eval_set)
            self.metrics.windows.inc()
            self.metrics.version.labels(lineage.adapter).set(outcome.update.version)
            self.metrics.loss.labels(lineage.adapter).set(outcome.update.train_loss)
        else:
            assert outcome.window is not None
            lineage.record_quarantine(outcome.window)
            self.metrics.quarantined.inc()

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


# The LoRA settings a lineage keeps for life, with the variable that sets each.
_LINEAGE_SETTINGS = (
    ("r", "LORASTREAM_LORA_R"),
    ("alpha", "LORASTREAM_LORA_ALPHA"),
    ("target_modules", "LORASTREAM_LORA_TARGET_MODULES"),
    ("dropout", "LORASTREAM_LORA_DROPOUT"),
)


def settings_differ(lineage: LoraSpec, configured: LoraSpec) -> str | None:
    """None when a trainer with ``configured`` may continue a lineage made with
    ``lineage``; else one sentence naming the variable, the lineage's value and the new one.
    (A lineage's settings are its first version's: every version carries them.)"""
    for name, variable in _LINEAGE_SETTINGS:
        theirs, ours = getattr(lineage, name), getattr(configured, name)
        if name == "target_modules":
            same = sorted(theirs) == sorted(ours)
            theirs, ours = ",".join(theirs), ",".join(ours)
        else:
            same = float(theirs) == float(ours)
        if not same:
            return (
                f"{variable} is {ours}, but the lineage was trained with {theirs}; a lineage "
                f"keeps its LoRA settings: set {variable}={theirs} again, or train a new "
                "lineage with the new value (lorastream replay --adapter NAME --into NEW)"
            )
    return None


def hold_reason(store: AdapterStore, update: AdapterUpdate, configured: LoraSpec) -> str | None:
    """Why a trainer with LoRA settings ``configured`` holds the adapter whose newest version
    is ``update`` (a setting that differs, or a file not as announced), or None. What
    ``status`` and ``adapters list`` show, by the trainer's own checks."""
    differs = settings_differ(update.lora, configured)
    if differs is not None:
        return differs
    try:
        store.verify(update.adapter, update.version, update.manifest_sha256, update.sha256)
    except AdapterStoreError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class _Evaluation:
    """A version's evaluation set, its measure on it, and how long measuring took."""

    examples: list[EvalExample]
    spec: EvalSpec | None
    seconds: float
