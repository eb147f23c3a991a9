"""Length buckets: each micro-batch padded up to a few lengths, for a compiled or captured
step. The padding is masked out of attention and of the loss, so the loss, every LoRA
gradient and the weights after the step are those without buckets (fp32 rounding)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from trainer.batching import IGNORE, bucket_length, pad
from trainer.config import LoraSettings
from trainer.lora import LoraStepper
from trainer.model import load_base_model

WINDOW = [
    (f"question {i}: " + "why " * (i * 3 % 17), f"answer {i}" + " because" * (i % 5))
    for i in range(16)
]


@pytest.mark.parametrize(
    ("length", "max_length", "bucket"),
    [(1, 2048, 64), (64, 2048, 64), (65, 2048, 128), (1000, 2048, 1024), (1025, 2048, 2048),
     (200, 300, 256), (290, 300, 300), (300, 300, 300), (40, 50, 50)],
)  # fmt: skip
def test_a_row_goes_to_the_least_power_of_two_bucket_within_max_length(
    length: int, max_length: int, bucket: int
) -> None:
    assert bucket_length(length, max_length) == bucket


def test_pad_to_a_width_masks_the_extra_columns() -> None:
    ids, mask, labels = pad([([5, 6], [7, 1]), ([5], [1])], pad_id=0, width=8)
    assert ids.shape == mask.shape == labels.shape == (2, 8)
    assert mask.sum(1).tolist() == [4, 2]
    assert labels[0].tolist() == [IGNORE, IGNORE, 7, 1] + [IGNORE] * 4
    with pytest.raises(ValueError, match="width 3 is shorter than the longest row"):
        pad([([5, 6], [7, 1])], pad_id=0, width=3)


@contextmanager
def _gradients(stepper: LoraStepper) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Each optimizer step's LoRA gradients, as the optimizer is about to use them."""
    seen: list[dict[str, torch.Tensor]] = []
    names = {id(p): k for k, p in stepper.params.items()}

    def record(optimizer: torch.optim.Optimizer, *_: object) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        seen.append({names[id(p)]: p.grad.clone() for p in params if id(p) in names})

    handle = register_optimizer_step_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("budget", [100_000, 300])
def test_padding_to_a_bucket_changes_no_loss_or_gradient_beyond_1e_6_relative(
    tiny_model_dir: Path, budget: int
) -> None:
    runs = {}
    for buckets in (False, True):
        base = load_base_model(tiny_model_dir, torch.device("cpu"))
        lora = LoraSettings(length_buckets=buckets, token_budget=budget)
        stepper = LoraStepper(base, lora, seed=0)
        batches, _ = stepper._micro_batches(WINDOW)
        widths = [ids.shape[1] for _, ids, _, _ in batches]
        state, losses = stepper.initial_state(), []
        with _gradients(stepper) as gradients:
            for _ in range(2):  # the second step has lora_A's gradients (B is 0 at first)
                result = stepper.step(state, WINDOW)
                state, losses = result.state, [*losses, result.loss]
        runs[buckets] = (widths, losses, gradients, state)
    (plain_widths, *plain), (bucket_widths, *bucketed) = runs[False], runs[True]
    assert all(w in (64, 128) for w in bucket_widths), bucket_widths
    assert bucket_widths != plain_widths, "the buckets must pad the window"
    for a, b in zip(bucketed[0], plain[0], strict=True):
        assert a == pytest.approx(b, rel=1e-6)
    assert len(bucketed[1]) == len(plain[1]) == 2
    for step_a, step_b in zip(bucketed[1], plain[1], strict=True):
        assert step_a.keys() == step_b.keys() and len(step_b) == 8
        for key in step_b:
            assert _relative(step_a[key], step_b[key]) <= 1e-6, key
    for key, weight in plain[2].weights.items():
        assert _relative(bucketed[2].weights[key], weight) <= 1e-6, key
