"""An offline LoRA fine-tune on a fixed set of examples: the reference a stream is judged by.

The same model, LoRA settings and AdamW step as the live trainer
(:meth:`~trainer.lora.LoraStepper.step`), but with every example known in
advance: several epochs, each in a fresh shuffled order, in batches. The
benchmark (``bench/bench_learning.py``) and the demo run it on exactly the
events a stream trained on, and compare held-out losses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from trainer.lora import AdapterState, LoraStepper

__all__ = ["fine_tune", "mean_loss"]


def fine_tune(
    stepper: LoraStepper,
    examples: Sequence[tuple[str, str]],
    batch_size: int,
    epochs: int,
    seed: int | str = 0,
) -> list[AdapterState]:
    """The state after each of ``epochs`` shuffled passes over ``examples``, in batches of
    ``batch_size``, from the stepper's initial state. Each batch is ``stepper.step``: give
    a stepper with one step per window for the plain offline run."""
    if not examples:
        raise ValueError("an offline fine-tune needs at least one example")
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be at least 1, not {batch_size}, {epochs}")
    rng = random.Random(seed)
    order = list(examples)
    state = stepper.initial_state()
    states = []
    for _ in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            state = stepper.step(state, order[start : start + batch_size]).state
        states.append(state)
    return states


def mean_loss(
    stepper: LoraStepper, state: AdapterState | None, examples: Sequence[tuple[str, str]]
) -> float:
    """The mean cross-entropy per response token of ``examples`` under ``state`` (None: the
    base model alone), as the trainer's evaluation computes it."""
    sums = stepper.losses(state, examples)
    return sum(total for total, _ in sums) / sum(tokens for _, tokens in sums)
