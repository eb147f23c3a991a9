"""A long window in bounded memory: token-budget micro-batches, a chunked loss, and an
adapter kept resident between windows, each giving the arithmetic of the plain way.

Micro-batches and chunks change only how the sums are grouped, so their results
equal one big batch's within fp32 rounding; keeping a state resident changes no
arithmetic at all, so its results are bit for bit those of loading every state
afresh.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainer.batching import build_batch, plan
from trainer.config import LoraSettings
from trainer.lora import AdapterState, LoraStepper, _compile_layers
from trainer.loss import response_token_losses
from trainer.model import BaseModel, load_base_model

# Lengths that differ a lot, so that budgets split the window in many ways.
WINDOW = [
    (f"question {i}: " + "why " * (i * 3 % 17), f"answer {i}" + " because" * (i % 5))
    for i in range(16)
]


def _stepper(model_dir: Path, **settings: object) -> LoraStepper:
    base = load_base_model(model_dir, torch.device("cpu"))
    return LoraStepper(base, LoraSettings(**settings), seed=0)  # type: ignore[arg-type]


def _close(a: AdapterState, b: AdapterState, tolerance: float = 1e-6) -> bool:
    return all(torch.allclose(a.weights[k], b.weights[k], atol=tolerance) for k in a.weights)


def _equal(a: AdapterState, b: AdapterState) -> bool:
    return all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights) and all(
        torch.equal(a.optimizer[k], b.optimizer[k]) for k in a.optimizer
    )


def _fresh(state: AdapterState) -> AdapterState:
    """The same values in new tensors: a stepper cannot know it has seen them."""
    return AdapterState(
        weights={k: t.clone() for k, t in state.weights.items()},
        optimizer={k: t.clone() for k, t in state.optimizer.items()},
        steps=state.steps,
    )


# ── micro-batches by a token budget ─────────────────────────────────────────


@pytest.mark.parametrize("budget", [1, 7, 40, 100, 333, 10_000])
def test_a_plan_covers_every_example_once_within_the_budget(budget: int) -> None:
    lengths = [5, 40, 12, 12, 90, 3, 40, 41, 7]
    batches = plan(lengths, budget)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= budget or len(batch) == 1, (batch, padded)
    if len(lengths) * max(lengths) <= budget:
        assert batches == [list(range(len(lengths)))], "a window that fits keeps its order"


@pytest.mark.parametrize("budget", [1, 60, 150, 400])
def test_any_token_budget_gives_the_loss_and_weights_of_one_batch(
    tiny_model_dir: Path, budget: int
) -> None:
    whole = _stepper(tiny_model_dir, token_budget=100_000)
    split = _stepper(tiny_model_dir, token_budget=budget)
    lengths = build_batch(whole.base.tokenizer, WINDOW, 2048)[1].sum(1).tolist()
    assert len(plan(lengths, budget)) > 1, "the budget must split the window"
    a, b = whole.initial_state(), split.initial_state()
    for _ in range(3):
        one, many = whole.step(a, WINDOW), split.step(b, WINDOW)
        assert many.loss == pytest.approx(one.loss, rel=1e-6)
        assert many.tokens == one.tokens
        a, b = one.state, many.state
    assert _close(a, b), "the micro-batches' gradients are not the window's"


# ── the chunked loss ─────────────────────────────────────────────────────────


@pytest.mark.parametrize("chunk", [1, 5, 64, 100_000])
def test_the_chunked_loss_equals_the_plain_cross_entropy_and_its_gradients(
    base: BaseModel, chunk: int
) -> None:
    stepper = LoraStepper(base, LoraSettings(target_modules=("q_proj", "v_proj", "lm_head")))
    ids, mask, labels = build_batch(base.tokenizer, WINDOW, 2048)
    stepper.model.train()

    logits = stepper.model(input_ids=ids, attention_mask=mask).logits
    targets = labels[:, 1:]
    plain = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    plain.backward()
    plain_grads = {k: p.grad.clone() for k, p in stepper.params.items()}  # type: ignore[union-attr]
    for p in stepper.params.values():
        p.grad = None

    losses, rows = response_token_losses(stepper.causal_lm, ids, mask, labels, chunk)
    assert len(losses) == int((targets != -100).sum())
    assert rows.tolist() == (targets != -100).nonzero()[:, 0].tolist()
    assert float(losses.sum().detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
    losses.sum().backward()
    for key, p in stepper.params.items():
        assert torch.allclose(p.grad, plain_grads[key], atol=1e-6), key  # type: ignore[arg-type]


def test_gradient_checkpointing_changes_no_result(tiny_model_dir: Path) -> None:
    plain = _stepper(tiny_model_dir)
    checkpointed = _stepper(tiny_model_dir, gradient_checkpointing=True)
    a = plain.step(plain.initial_state(), WINDOW)
    b = checkpointed.step(checkpointed.initial_state(), WINDOW)
    assert b.loss == pytest.approx(a.loss, rel=1e-6) and _close(a.state, b.state)


def test_compile_is_ignored_on_the_cpu_so_its_results_stay_bit_for_bit(
    tiny_model_dir: Path,
) -> None:
    plain, asked = _stepper(tiny_model_dir), _stepper(tiny_model_dir, compile=True)
    assert not asked.compiled
    a = plain.step(plain.initial_state(), WINDOW)
    b = asked.step(asked.initial_state(), WINDOW)
    assert a.loss == b.loss
    assert all(torch.equal(a.state.weights[k], b.state.weights[k]) for k in a.state.weights)


def test_compiled_decoder_layers_train_and_evaluate_as_the_eager_ones(
    tiny_model_dir: Path,
) -> None:
    """The GPU's compile option, forced onto the CPU: two windows and an evaluation give
    what eager PyTorch gives, within fp32 rounding (the fused kernels reorder sums)."""
    eager, compiled = _stepper(tiny_model_dir), _stepper(tiny_model_dir)
    _compile_layers(compiled.causal_lm)
    results = []
    for stepper in (eager, compiled):
        first = stepper.step(stepper.initial_state(), WINDOW)
        second = stepper.step(first.state, WINDOW)
        results.append((first, second, stepper.losses(second.state, WINDOW[:4])))
    (a1, a2, a_eval), (b1, b2, b_eval) = results
    assert b1.loss == pytest.approx(a1.loss, rel=1e-5)
    assert b2.loss == pytest.approx(a2.loss, rel=1e-5) and b2.loss < b1.loss
    assert _close(a2.state, b2.state, tolerance=1e-5)
    assert [n for _, n in b_eval] == [n for _, n in a_eval]
    assert [s for s, _ in b_eval] == pytest.approx([s for s, _ in a_eval], rel=1e-5)


# ── resident adapters ────────────────────────────────────────────────────────


def test_adapters_kept_resident_train_bit_for_bit_as_if_each_were_loaded_afresh(
    tiny_model_dir: Path,
) -> None:
    """Two adapters in turn, three ways: a device cache big enough for both; none (the
    stepper steps on only from the state it just made); and every state handed over in
    new tensors, so that each is loaded and its optimizer rebuilt."""
    windows = {"x": WINDOW[:8], "y": WINDOW[8:]}
    runs = {}
    for name, resident in (("cached", 2**30), ("uncached", 0), ("fresh", 0)):
        stepper = _stepper(tiny_model_dir, resident_bytes=resident)
        states = {a: stepper.initial_state() for a in windows}
        for _ in range(3):
            for adapter, window in windows.items():
                given = _fresh(states[adapter]) if name == "fresh" else states[adapter]
                states[adapter] = stepper.step(given, window).state
        if name == "cached":
            assert len(stepper._resident) == 1, "the other adapter was not kept resident"
        runs[name] = states
    for adapter in windows:
        assert _equal(runs["cached"][adapter], runs["uncached"][adapter]), adapter
        assert _equal(runs["cached"][adapter], runs["fresh"][adapter]), adapter


def test_a_failed_step_leaves_nothing_resident_that_the_retry_could_reuse(
    tiny_model_dir: Path,
) -> None:
    stepper = _stepper(tiny_model_dir, resident_bytes=2**30)
    state = stepper.step(stepper.initial_state(), WINDOW).state
    poisoned = AdapterState(
        weights={k: torch.full_like(t, float("nan")) for k, t in state.weights.items()},
        optimizer=state.optimizer,
        steps=state.steps,
    )
    with pytest.raises(Exception, match="not a finite number"):
        stepper.step(poisoned, WINDOW)
    retried = stepper.step(state, WINDOW).state
    reference = _stepper(tiny_model_dir)
    expected = reference.step(reference.step(reference.initial_state(), WINDOW).state, WINDOW)
    assert _equal(retried, expected.state)


# ── a long window in bounded memory ──────────────────────────────────────────

_PEAK = textwrap.dedent(
    """
    import resource, sys
    import torch
    from pathlib import Path
    from trainer.config import LoraSettings
    from trainer.lora import LoraStepper
    from trainer.model import load_base_model

    base = load_base_model(Path(sys.argv[1]), torch.device("cpu"))
    stepper = LoraStepper(base, LoraSettings(token_budget=int(sys.argv[2])), seed=0)
    window = [("x" * 2000 + f" {i}", "answer " * 6) for i in range(16)]  # 16 x ~2,048 tokens
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = stepper.step(stepper.initial_state(), window)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(result.tokens, (after - before) // 1024)
    """
)


def _peak_growths_mb(model_dir: Path, *budgets: int) -> list[int]:
    """The step's peak growth under each budget, each in a process of its own (peak RSS is
    per process, so they run at once)."""
    running = [
        subprocess.Popen(
            [sys.executable, "-c", _PEAK, str(model_dir), str(budget)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        for budget in budgets
    ]
    growths = []
    for process in running:
        stdout, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
        tokens, growth = stdout.split()
        assert int(tokens) > 16 * 40
        growths.append(int(growth))
    return growths


@pytest.mark.timed  # asserts on wall time or memory
@pytest.mark.timeout(300)
def test_a_window_of_16_examples_of_2048_tokens_stays_within_a_memory_bound(
    tiny_model_dir: Path,
) -> None:
    """With the default budget (8,192 padded tokens per micro-batch) the step's peak
    resident memory grows by under 600 MB (240-350 here); the same window as one batch
    needs more than twice that (750-1,030 here)."""
    bounded, whole = _peak_growths_mb(tiny_model_dir, LoraSettings().token_budget, 10**9)
    assert bounded < 600, f"the step grew the process by {bounded} MB"
    assert whole > 2 * bounded, (whole, bounded)
