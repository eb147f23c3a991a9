"""The state copy after a step: through reused host buffers, waited for only when read.

On a GPU the copy is enqueued into pinned buffers with ``non_blocking=True`` and a
CUDA event; here the same code runs with ``buffered_copy=True`` on the CPU (plain
buffers, no event), and must write exactly the files of the plain copy.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from trainer.adapter_state import AdapterState
from trainer.config import LoraSettings
from trainer.lora import LoraStepper
from trainer.model import load_base_model
from trainer.store import AdapterStore

WINDOW = [("2+2=", "4"), ("capital of France:", "Paris"), ("opposite of hot:", "cold")] * 4


def _stepper(model_dir: Path, buffered: bool | None) -> LoraStepper:
    base = load_base_model(model_dir, torch.device("cpu"))
    return LoraStepper(base, LoraSettings(), seed=0, buffered_copy=buffered)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_the_async_state_copy_writes_the_same_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Three windows stepped before any state is read (each copy still pending while the
    next step runs), then every version written: the same bytes as the plain copy's."""
    written = {}
    for buffered in (False, True):
        stepper = _stepper(tiny_model_dir, buffered)
        assert (stepper.host_copies is not None) == buffered
        states = [stepper.initial_state()]
        for _ in range(3):
            states.append(stepper.step(states[-1], WINDOW).state)
        assert all(s.ready for s in states[1:]) != buffered, "the copies should be pending"
        store = AdapterStore(tmp_path / f"buffered-{buffered}")
        for version, state in enumerate(states[1:], start=1):
            store.write("a", version, state, stepper, {"adapter": "a", "version": version})
        assert all(s.ready for s in states)
        written[buffered] = _files(tmp_path / f"buffered-{buffered}")
    assert len(written[False]) >= 3 * 3
    assert written[True] == written[False]


def test_the_default_copy_on_the_cpu_is_the_plain_one(tiny_model_dir: Path) -> None:
    stepper = _stepper(tiny_model_dir, None)
    assert stepper.host_copies is None
    assert stepper.step(stepper.initial_state(), WINDOW).state.ready


def test_the_buffers_are_reused_across_steps_and_given_back_by_unread_states(
    tiny_model_dir: Path,
) -> None:
    stepper = _stepper(tiny_model_dir, True)
    copies = stepper.host_copies
    assert copies is not None
    state = stepper.initial_state()
    for _ in range(4):  # each state read before the next step: one set of buffers serves all
        state = stepper.step(state, WINDOW).state
        state.wait()
    assert copies.allocations == 1
    pending = stepper.step(state, WINDOW).state
    assert "pending" in repr(pending)  # printing a state never waits
    after = stepper.step(pending, WINDOW).state  # the first is still unread: a second set
    assert copies.allocations == 2
    del pending, after
    gc.collect()
    state = stepper.step(state, WINDOW).state
    state = stepper.step(state, WINDOW).state
    assert copies.allocations == 2, "the unread states' buffers were not given back"


def test_a_read_state_owns_its_tensors_whatever_later_steps_copy(tiny_model_dir: Path) -> None:
    """The values read out of the buffers are the state's own: a later step, reusing the
    buffers, changes none of them."""
    stepper = _stepper(tiny_model_dir, True)
    one = stepper.step(stepper.initial_state(), WINDOW).state
    weights = {k: t.clone() for k, t in one.weights.items()}
    moments = {k: t.clone() for k, t in one.optimizer.items()}
    two = stepper.step(one, WINDOW).state
    assert any(not torch.equal(two.weights[k], weights[k]) for k in weights)
    assert all(torch.equal(one.weights[k], weights[k]) for k in weights)
    assert all(torch.equal(one.optimizer[k], moments[k]) for k in moments)
    assert isinstance(one, AdapterState) and one.steps == 1 and two.steps == 2
