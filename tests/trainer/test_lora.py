"""The LoRA step on the built-in tiny model: masking, learning, determinism, failures."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from trainer.batching import IGNORE, build_batch
from trainer.config import LoraSettings
from trainer.exceptions import NonFiniteLossError, StepError
from trainer.lora import AdapterState, LoraStepper
from trainer.model import BaseModel, load_base_model

PAIRS = [
    ("2+2=", "4"),
    ("capital of France:", "Paris"),
    ("opposite of hot:", "cold"),
    ("color of the sky:", "blue"),
]
WINDOW = PAIRS * 4  # 16 examples


def test_the_loss_covers_response_tokens_only(base: BaseModel) -> None:
    ids, mask, labels = build_batch(base.tokenizer, [("abc", "xy"), ("a", "wxyz")], 512)
    eos = base.tokenizer.eos_token_id
    prompt_a = base.tokenizer("abc", add_special_tokens=False).input_ids
    response_a = base.tokenizer("xy", add_special_tokens=False).input_ids
    assert ids[0, : len(prompt_a)].tolist() == prompt_a
    assert labels[0].tolist()[: len(prompt_a)] == [IGNORE] * len(prompt_a)
    assert labels[0, len(prompt_a) :].tolist() == [*response_a, eos]
    # Right padding: masked out of attention and of the loss.
    assert ids.shape[1] == 1 + 4 + 1
    assert mask[0].tolist() == [1] * 6 and labels[0, 5].item() == eos
    assert mask[1].tolist() == [1] * 6


def test_a_too_long_example_keeps_its_response_and_loses_the_prompt_head(base: BaseModel) -> None:
    ids, mask, labels = build_batch(base.tokenizer, [("p" * 50, "r" * 5)], 16)
    assert ids.shape == (1, 16)
    assert int((labels != IGNORE).sum()) == 6  # five response bytes and the eos
    assert int(mask.sum()) == 16


def test_the_loss_falls_from_window_to_window_on_a_learnable_task(base: BaseModel) -> None:
    stepper = LoraStepper(base, LoraSettings(), seed=0)
    state = stepper.initial_state()
    losses = []
    for _ in range(8):
        result = stepper.step(state, WINDOW)
        losses.append(result.loss)
        state = result.state
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.1, losses
    assert state.steps == 8
    assert {k.rsplit(".", 1)[-1] for k in state.optimizer} == {"step", "exp_avg", "exp_avg_sq"}


def test_a_step_leaves_the_callers_state_untouched_and_changes_the_weights(
    base: BaseModel,
) -> None:
    """The first step is AdamW's first: every weight with a gradient moves by
    ``lr * g / (|g| + eps)``, so by at most the learning rate and nearly by it. LoRA's B
    starts at zero, so A has no gradient yet: only the B matrices move, every entry of them."""
    settings = LoraSettings()
    stepper = LoraStepper(base, settings, seed=0)
    state = stepper.initial_state()
    before = {k: t.clone() for k, t in state.weights.items()}
    result = stepper.step(state, WINDOW)
    assert all(torch.equal(state.weights[k], before[k]) for k in before)
    assert {k.rsplit(".", 2)[-2] for k in before} == {"lora_A", "lora_B"}
    lr = settings.learning_rate
    for key, old in before.items():
        moved = (result.state.weights[key] - old).abs()
        if ".lora_A." in key:
            assert torch.equal(result.state.weights[key], old), key
        else:
            assert bool((moved > 0.5 * lr).all()), (key, float(moved.min()))
            assert float(moved.max()) <= lr * (1 + 1e-5), (key, float(moved.max()))
    assert result.tokens == sum(len(r.encode()) + 1 for _, r in WINDOW)


def test_same_seed_same_events_same_weights_whatever_the_adapter(tiny_model_dir: Path) -> None:
    """Two processes' worth of stepper (fresh loads), same seed: bit-identical lineages."""

    def lineage(seed: int) -> list[dict[str, torch.Tensor]]:
        base = load_base_model(tiny_model_dir, torch.device("cpu"))
        stepper = LoraStepper(base, LoraSettings(), seed=seed)
        state, out = stepper.initial_state(), []
        for _ in range(3):
            state = stepper.step(state, WINDOW).state
            out.append(state.weights)
        return out

    first, second, other_seed = lineage(0), lineage(0), lineage(1)
    for a, b in zip(first, second, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(first[0][k], other_seed[0][k]) for k in first[0])


def test_optimizer_state_carries_over(base: BaseModel) -> None:
    """Stepping from a state whose moments were dropped gives other weights: they are used."""
    stepper = LoraStepper(base, LoraSettings(), seed=0)
    one = stepper.step(stepper.initial_state(), WINDOW).state
    two = stepper.step(one, WINDOW).state
    amnesiac = AdapterState(weights=one.weights, optimizer={}, steps=one.steps)
    other = stepper.step(amnesiac, WINDOW).state
    assert any(not torch.equal(two.weights[k], other.weights[k]) for k in two.weights)


def test_steps_per_window_are_that_many_steps_on_the_window_reporting_the_first_loss(
    tiny_model_dir: Path,
) -> None:
    """Three steps per window are, bit for bit, three one-step windows of the same events
    (the optimizer's moments and step count carried between them); the loss announced is
    the window's loss before it trained, the first step's."""
    three = LoraStepper(
        load_base_model(tiny_model_dir, torch.device("cpu")),
        LoraSettings(steps_per_window=3),
        seed=0,
    )
    one = LoraStepper(load_base_model(tiny_model_dir, torch.device("cpu")), LoraSettings(), seed=0)
    result = three.step(three.initial_state(), WINDOW)

    state, losses = one.initial_state(), []
    for _ in range(3):
        single = one.step(state, WINDOW)
        state, losses = single.state, [*losses, single.loss]
    assert result.loss == losses[0] and losses[2] < losses[0] - 0.05, losses
    assert result.state.steps == state.steps == 3
    assert all(torch.equal(result.state.weights[k], state.weights[k]) for k in state.weights)
    assert all(torch.equal(result.state.optimizer[k], state.optimizer[k]) for k in state.optimizer)
    # ... and not one step's weights.
    first = one.step(one.initial_state(), WINDOW).state
    assert any(not torch.equal(first.weights[k], state.weights[k]) for k in state.weights)


def test_a_non_finite_loss_raises_and_changes_nothing(base: BaseModel) -> None:
    stepper = LoraStepper(base, LoraSettings(), seed=0)
    state = stepper.initial_state()
    poisoned = AdapterState(
        weights={k: torch.full_like(t, float("nan")) for k, t in state.weights.items()}
    )
    with pytest.raises(NonFiniteLossError, match="not a finite number"):
        stepper.step(poisoned, WINDOW)
    # The stepper is still good for the next window.
    assert stepper.step(state, WINDOW).loss == stepper.step(state, WINDOW).loss


def test_unknown_target_modules_are_an_error(base: BaseModel) -> None:
    with pytest.raises(StepError, match=r"target_modules \('gate_projx',\) match no module"):
        LoraStepper(base, LoraSettings(target_modules=("gate_projx",)), seed=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("r", 0),
        ("alpha", 0),
        ("dropout", 1.0),
        ("learning_rate", float("nan")),
        ("target_modules", ()),
        ("steps_per_window", 0),
    ],
)
def test_lora_settings_name_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"LoraSettings.{field}"):
        LoraSettings(**{field: value})  # type: ignore[arg-type]


def test_an_adapter_state_prints_as_a_summary_not_its_weights(base: BaseModel) -> None:
    state = LoraStepper(base, LoraSettings(), seed=0).initial_state()
    assert repr(state) == "AdapterState(8 LoRA tensors, 4096 values, 0 optimizer tensors, steps=0)"


def test_an_adapter_file_holds_lora_tensors_only_even_with_lm_head_targeted(
    base: BaseModel, tmp_path: Path
) -> None:
    """PEFT's default would also write the base model's lm_head and embeddings into every
    version: for a real model, the full vocabulary matrices in each adapter file."""
    from safetensors.torch import load_file

    stepper = LoraStepper(base, LoraSettings(target_modules=("q_proj", "lm_head")), seed=0)
    state = stepper.step(stepper.initial_state(), [("2+2?", "4")]).state
    stepper.save_peft(state, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any("lm_head.lora_" in name for name in tensors)
    assert all(".lora_A." in name or ".lora_B." in name for name in tensors), sorted(tensors)


def test_lorastream_compile_reaches_the_stepper_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorastream.settings import Settings
    from lorastream.stages import lora_settings

    assert lora_settings(Settings()).compile is False
    monkeypatch.setenv("LORASTREAM_COMPILE", "true")
    assert lora_settings(Settings()).compile is True
