"""Measuring a new version: on its adapter's held-out events, per segment, and on the
general set, each beside the base model.

The measures read the new state and change nothing a step reads, so the weights are the
same with or without them; a measure that fails is logged and left null (an evaluation
never costs a window its version). The base model's loss on the general set is taken
once per process: the base never changes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from schemas import EvalSpec, GeneralEvalSpec
from trainer.config import TrainingConfig
from trainer.evaluation import EvalExample, extend_eval_set, segment_losses, trained_segment
from trainer.lora import AdapterState, LoraStepper, StepResult
from trainer.window import Window

__all__ = ["Evaluation", "Measure"]

log = logging.getLogger("trainer.core")


@dataclass(frozen=True)
class Evaluation:
    """A version's evaluation set, its measure on it, and how long measuring took."""

    examples: list[EvalExample]
    spec: EvalSpec | None
    seconds: float
    general: GeneralEvalSpec | None = None


class Measure:
    """The evaluations of :class:`~trainer.core.WindowTrainer`'s versions."""

    def __init__(self, config: TrainingConfig, stepper: LoraStepper) -> None:
        self.config = config
        self.stepper = stepper
        # The base model's summed loss on the general set, measured once: it never changes.
        self._general_base: float | None = None

    def version(
        self,
        window: Window,
        previous: list[EvalExample],
        result: StepResult,
        adapter: str,
        version: int,
    ) -> Evaluation | None:
        """The new version's evaluation set (``previous`` plus the window's held-out
        events), its measure on it and on the general set; None while both are off.

        With the held-out evaluation off and a general set on, the set stays empty and
        unwritten: only the general measure is taken."""
        general = self.config.general_eval
        if not self.config.evaluates and general is None:
            return None
        started = time.perf_counter()
        eval_set: list[EvalExample] = []
        spec = None
        if self.config.evaluates:
            windows = self.config.eval_segment_windows
            eval_set = extend_eval_set(
                previous,
                (
                    EvalExample.of(window.tp.topic, window.tp.partition, p, version, windows)
                    for p in window.held_out
                ),
                self.config.eval_size,
            )
            segment = trained_segment([p.event for p in window.events], version, windows)
            spec, _ = self._held_out(result.state, eval_set, adapter, version, segment)
        general_spec = self._general(result.state, adapter, version) if general else None
        return Evaluation(eval_set, spec, time.perf_counter() - started, general_spec)

    def _general(self, state: AdapterState, adapter: str, version: int) -> GeneralEvalSpec | None:
        """The version and the base model on the general set (None when it cannot be
        measured: like the held-out evaluation, it never costs a window its version).

        The base model's loss is measured once per process: the base never changes."""
        general = self.config.general_eval
        assert general is not None
        try:
            if self._general_base is None:
                base = self.stepper.losses(None, general.examples)
                self._general_base = sum(total for total, _ in base)
            sums = self.stepper.losses(state, general.examples)
            count = sum(tokens for _, tokens in sums)
            return GeneralEvalSpec(
                loss=sum(total for total, _ in sums) / count,
                base_loss=self._general_base / count,
                events=len(general.examples),
                sha256=general.sha256,
            )
        except Exception as exc:
            log.warning(
                "%s v%d: general evaluation failed, general_eval is null (%r)",
                adapter,
                version,
                exc,
            )
            return None

    def _held_out(
        self,
        state: AdapterState,
        eval_set: list[EvalExample],
        adapter: str,
        version: int,
        segment: str | None = None,
    ) -> tuple[EvalSpec | None, float]:
        """The version's ``eval`` (None for an empty set, or one that cannot be measured:
        an evaluation never costs a window its version) and the seconds it took.

        Besides the whole set's loss, each segment's (:mod:`trainer.evaluation`), in order
        of first appearance in the set; ``segment`` is the one the version trained in."""
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
                segments=segment_losses(eval_set, sums),
                segment=segment,
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
