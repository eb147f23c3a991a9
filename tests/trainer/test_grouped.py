"""Many adapters in one step: each takes exactly the step it would have taken alone.

The reference is ``LoraStepper.step``, one adapter at a time, each on a fresh load
of the tiny model with that adapter's own settings. The group runs on another
stepper's model (its PEFT adapter off for the pass), fp32 on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.adapter_state import AdapterState
from trainer.config import LoraSettings
from trainer.exceptions import NonFiniteLossError, StepError
from trainer.grouped import GroupedStepper, Member, plan_groups, stand_in
from trainer.lora import LoraStepper, StepResult
from trainer.model import load_base_model

WINDOWS = [
    [(f"q{i}: " + "why " * (i % 5), f"a{i}" + " so" * (i % 3)) for i in range(6)],
    [("2+2=", "4"), ("capital of France:", "Paris"), ("opposite of hot:", "cold")] * 2,
    [(f"long question {i} " + "and more " * (3 + i), f"answer {i}") for i in range(5)],
]
# Different ranks, scales, learning rates and target modules (k_proj and o_proj are not
# targeted by the stepper whose model the group runs on).
MIXED = [
    LoraSettings(),
    # AdamW's first step moves a weight by lr * g / (|g| + 1e-8): where a gradient is near
    # 1e-8 (some of k_proj's here) it multiplies g's rounding by up to lr * 1e8 / 4, so
    # this adapter's rate keeps that under 1e-6.
    LoraSettings(r=4, alpha=8, target_modules=("q_proj", "k_proj", "o_proj"), learning_rate=2e-4),
    LoraSettings(r=2, alpha=16, target_modules=("v_proj",), weight_decay=0.01),
]


def _stepper(model_dir: Path, lora: LoraSettings) -> LoraStepper:
    return LoraStepper(load_base_model(model_dir, torch.device("cpu")), lora, seed=0)


def _singles(model_dir: Path, settings: list[LoraSettings], steps: int) -> list[list[AdapterState]]:
    """Each adapter stepped alone ``steps`` windows: its states, initial one first."""
    out = []
    for lora, window in zip(settings, WINDOWS, strict=True):
        stepper = _stepper(model_dir, lora)
        states = [stepper.initial_state()]
        for _ in range(steps):
            states.append(stepper.step(states[-1], window).state)
        out.append(states)
    return out


def _assert_within(a: AdapterState, b: AdapterState) -> None:
    """Weights within 1e-6; moments within 1e-6 of their tensor's largest value (2e-6 for
    the second moments, squares). The differences are fp32 rounding: the base GEMM and the
    loss sums run on other shapes than in the single step."""
    assert set(a.weights) == set(b.weights) and set(a.optimizer) == set(b.optimizer)
    for key in b.weights:
        error = float((a.weights[key] - b.weights[key]).abs().max())
        assert error <= 1e-6, (key, error)
    for key in b.optimizer:
        error = float((a.optimizer[key] - b.optimizer[key]).abs().max())
        bound = (2e-6 if key.endswith("_sq") else 1e-6) * float(b.optimizer[key].abs().max())
        assert error <= bound, (key, error, bound)


def _ok(result: StepResult | StepError) -> StepResult:
    assert isinstance(result, StepResult), result
    return result


def test_the_grouped_step_equals_n_single_steps_for_different_ranks_and_targets(
    tiny_model_dir: Path,
) -> None:
    singles = _singles(tiny_model_dir, MIXED, steps=2)
    grouped = GroupedStepper(_stepper(tiny_model_dir, LoraSettings()), grouped_mm=False)
    for n in (1, 2):  # the second step uses the first's moments, and moves lora_A too
        results = grouped.step(
            [Member(s[n - 1], w, lora) for s, w, lora in zip(singles, WINDOWS, MIXED, strict=True)]
        )
        for result, single in zip(results, singles, strict=True):
            assert _ok(result).state.steps == n
            _assert_within(_ok(result).state, single[n])
    # Not trivially equal: every adapter moved.
    moved = [
        max(float((s[2].weights[k] - s[0].weights[k]).abs().max()) for k in s[0].weights)
        for s in singles
    ]
    assert all(m > 1e-4 for m in moved), moved


def test_the_grouped_step_reports_each_adapters_own_loss_and_tokens(tiny_model_dir: Path) -> None:
    """The loss is each adapter's mean over its own response tokens, never the group's."""
    alone = []
    for lora, window in zip(MIXED, WINDOWS, strict=True):
        stepper = _stepper(tiny_model_dir, lora)
        alone.append(stepper.step(stepper.initial_state(), window))
    grouped = GroupedStepper(_stepper(tiny_model_dir, LoraSettings()), grouped_mm=False)
    results = grouped.step(
        [
            Member(_stepper(tiny_model_dir, lora).initial_state(), w, lora)
            for w, lora in zip(WINDOWS, MIXED, strict=True)
        ]
    )
    for result, single in zip(results, alone, strict=True):
        assert _ok(result).tokens == single.tokens
        assert _ok(result).loss == pytest.approx(single.loss, rel=1e-6)
    assert len({single.tokens for single in alone}) == len(alone)


def test_grouped_matmuls_give_the_loops_result(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adapters of one shape: torch._grouped_mm (forced on the CPU) computes their deltas,
    and each still takes its single step."""
    same = [LoraSettings(), LoraSettings(learning_rate=1e-3), LoraSettings(alpha=8)]
    singles = _singles(tiny_model_dir, same, steps=2)
    calls = []
    real = torch._grouped_mm

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "_grouped_mm", counted)
    grouped = GroupedStepper(_stepper(tiny_model_dir, LoraSettings()), grouped_mm=True)
    for n in (1, 2):
        results = grouped.step(
            [Member(s[n - 1], w, lora) for s, w, lora in zip(singles, WINDOWS, same, strict=True)]
        )
        for result, single in zip(results, singles, strict=True):
            _assert_within(_ok(result).state, single[n])
    assert calls, "the grouped matmul path was not taken"


def test_a_window_that_fails_inside_a_group_fails_alone(tiny_model_dir: Path) -> None:
    """A poisoned state's NaNs stay in its rows: its result is the error, and the others
    take the very step they take without it."""
    same = [LoraSettings()] * 3
    singles = _singles(tiny_model_dir, same, steps=1)
    initial = singles[1][0]
    poisoned = AdapterState(
        weights={k: torch.full_like(t, float("nan")) for k, t in initial.weights.items()}
    )
    grouped = GroupedStepper(_stepper(tiny_model_dir, LoraSettings()), grouped_mm=False)
    results = grouped.step(
        [
            Member(singles[0][0], WINDOWS[0], same[0]),
            Member(poisoned, WINDOWS[1], same[1]),
            Member(singles[2][0], WINDOWS[2], same[2]),
        ]
    )
    assert isinstance(results[1], NonFiniteLossError)
    _assert_within(_ok(results[0]).state, singles[0][1])
    _assert_within(_ok(results[2]).state, singles[2][1])


def _equal(a: AdapterState, b: AdapterState) -> bool:
    return (
        a.steps == b.steps
        and a.weights.keys() == b.weights.keys()
        and a.optimizer.keys() == b.optimizer.keys()
        and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
        and all(torch.equal(a.optimizer[k], b.optimizer[k]) for k in a.optimizer)
    )


def test_stand_ins_of_the_recorded_shape_give_each_adapter_its_grouped_step_bit_for_bit(
    tiny_model_dir: Path,
) -> None:
    """What replay relies on: one adapter stepped with stand-ins (eos rows of the group's
    recorded token counts, no LoRA) in the others' places, on another load of the model,
    takes bit for bit the step it took in the group, for two windows in a row; without
    the stand-ins it does not (so the check can tell)."""
    live = GroupedStepper(_stepper(tiny_model_dir, LoraSettings()), grouped_mm=False)
    replay = GroupedStepper(_stepper(tiny_model_dir, LoraSettings()), grouped_mm=False)
    states = [_stepper(tiny_model_dir, lora).initial_state() for lora in MIXED]
    for _ in range(2):
        results = live.step(
            [Member(s, w, lora) for s, w, lora in zip(states, WINDOWS, MIXED, strict=True)]
        )
        shape = live.rows
        assert [len(rows) for rows in shape] == [len(w) for w in WINDOWS]
        for m in range(len(MIXED)):
            members = [
                Member(states[m], WINDOWS[m], MIXED[m]) if i == m else stand_in(shape[i], lora)
                for i, lora in enumerate(MIXED)
            ]
            again = replay.step(members)
            assert [r is None for r in again] == [i != m for i in range(len(MIXED))]
            assert replay.rows == shape
            assert _equal(_ok(again[m]).state, _ok(results[m]).state), m
            assert _ok(again[m]).loss == _ok(results[m]).loss
        states = [_ok(r).state for r in results]
    alone = replay.step([Member(states[1], WINDOWS[1], MIXED[1])])
    grouped = live.step(
        [Member(s, w, lora) for s, w, lora in zip(states, WINDOWS, MIXED, strict=True)]
    )
    assert not _equal(_ok(alone[0]).state, _ok(grouped[1]).state)
    _assert_within(_ok(alone[0]).state, _ok(grouped[1]).state)


@pytest.mark.parametrize("room", [2**30, 1])
def test_an_adapter_kept_on_the_device_steps_from_there_with_the_same_result(
    tiny_model_dir: Path, room: int
) -> None:
    """With room (``resident_bytes``), each adapter's tensors stay on the device after its
    grouped step, and its next step starts from them, not from its state's host copies: so
    garbling those copies changes nothing, and the steps are bit for bit those made from
    the host. Without room they are read from the host (and the garbling shows)."""
    reference = GroupedStepper(_stepper(tiny_model_dir, LoraSettings()), grouped_mm=False)
    kept = GroupedStepper(
        _stepper(tiny_model_dir, LoraSettings(resident_bytes=room)), grouped_mm=False
    )
    states = [_stepper(tiny_model_dir, lora).initial_state() for lora in MIXED]

    def members(of: list[AdapterState]) -> list[Member]:
        return [Member(s, w, lora) for s, w, lora in zip(of, WINDOWS, MIXED, strict=True)]

    expected = [_ok(r).state for r in reference.step(members(states))]
    first = [_ok(r).state for r in kept.step(members(states))]
    assert all(_equal(a, b) for a, b in zip(first, expected, strict=True))
    for state in first:  # the host copies, garbled in place
        for tensor in (*state.weights.values(), *state.optimizer.values()):
            if tensor.is_floating_point():
                tensor.fill_(0.5)
    second = [_ok(r).state for r in kept.step(members(first))]
    again = [_ok(r).state for r in reference.step(members(expected))]
    same = [_equal(a, b) for a, b in zip(second, again, strict=True)]
    assert same == ([True] * 3 if room > 1 else [False] * 3)


def test_a_stand_in_needs_a_response_token_in_every_row() -> None:
    with pytest.raises(StepError, match="at least one response token"):
        stand_in([(3, 0)], LoraSettings())
    with pytest.raises(StepError, match="at least one response token"):
        stand_in([], LoraSettings())


def test_the_group_leaves_the_steppers_own_adapter_as_it_was(tiny_model_dir: Path) -> None:
    stepper = _stepper(tiny_model_dir, LoraSettings())
    reference = _stepper(tiny_model_dir, LoraSettings())
    mine = stepper.step(stepper.initial_state(), WINDOWS[0]).state
    expected = reference.step(
        reference.step(reference.initial_state(), WINDOWS[0]).state, WINDOWS[0]
    )
    GroupedStepper(stepper, grouped_mm=False).step(
        [Member(stepper.initial_state(), WINDOWS[1], LoraSettings())]
    )
    after = stepper.step(mine, WINDOWS[0])
    assert all(torch.equal(after.state.weights[k], expected.state.weights[k]) for k in mine.weights)


@pytest.mark.parametrize(
    ("settings", "per_step", "groups"),
    [
        ([LoraSettings()] * 5, 2, [[0, 1], [2, 3], [4]]),
        ([LoraSettings()] * 3, 1, [[0], [1], [2]]),
        (
            [
                LoraSettings(),
                LoraSettings(dropout=0.1),
                LoraSettings(r=4, target_modules=("o_proj",)),
                LoraSettings(steps_per_window=2),
                LoraSettings(steps_per_window=2),
                LoraSettings(),
            ],
            4,
            [[0, 2, 5], [1], [3, 4]],
        ),
    ],
)
def test_adapters_group_only_where_the_group_gives_their_single_steps(
    settings: list[LoraSettings], per_step: int, groups: list[list[int]]
) -> None:
    """Ranks and targets may differ in a group; dropout steps alone (its random draws
    would not be the single step's), and steps_per_window must agree."""
    assert plan_groups(settings, per_step) == groups


def test_a_group_that_plan_groups_would_not_make_is_refused(tiny_model_dir: Path) -> None:
    stepper = _stepper(tiny_model_dir, LoraSettings())
    state = stepper.initial_state()
    with pytest.raises(StepError, match="one steps_per_window"):
        GroupedStepper(stepper).step(
            [
                Member(state, WINDOWS[0], LoraSettings()),
                Member(state, WINDOWS[1], LoraSettings(steps_per_window=2)),
            ]
        )
    with pytest.raises(ValueError, match="adapters per step must be at least 1"):
        plan_groups([LoraSettings()], 0)
