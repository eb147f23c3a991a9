"""Adapter versions trained once per session by the real core, and the contract servers.

``trained`` holds four versions of ``tutor`` on the built-in tiny model; each test gets
its own copy (``versions``), so that a test may corrupt its files. ``worsened`` holds
versions of ``tutor`` evaluated on held-out events, the newest of them made worse on
purpose: a window of garbage trained at a high learning rate. The contract servers
(``tests/serving/contract.py``) stand in for vLLM and SGLang.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from schemas import AdapterUpdate
from tests.serving.contract import ContractServer, contract_server

ADAPTER = "tutor"
VERSIONS = 4
EVERY_LAYER = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
)


@dataclass(frozen=True)
class Trained:
    model_dir: Path
    updates: list[AdapterUpdate]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from aiokafka import TopicPartition

    from lorastream.dev.events import learning_event
    from trainer.config import TrainingConfig
    from trainer.core import Trained as Outcome
    from trainer.core import WindowTrainer
    from trainer.lineage import Lineage
    from trainer.model import build_tiny_model_dir
    from trainer.window import Windows

    root = tmp_path_factory.mktemp("serving")
    model_dir = build_tiny_model_dir(root / "tiny").resolve()
    core = WindowTrainer.load(
        TrainingConfig(
            adapter_dir=root / "adapters",
            base_model=model_dir,
            base_model_name=str(model_dir),
            window_size=4,
            device="cpu",
        )
    )
    lineage = Lineage(ADAPTER)
    windows = Windows(4)
    tp = TopicPartition("learning-events", 0)
    for n in range(VERSIONS * 4):
        _, window = windows.offer(tp, n, learning_event(ADAPTER, n), lineage)
        if window is not None:
            outcome = core.train(window, lineage)
            assert isinstance(outcome, Outcome)
            lineage.record(outcome.update)
    assert [u.version for u in lineage.updates] == list(range(1, VERSIONS + 1))
    return Trained(model_dir, list(lineage.updates))


@pytest.fixture(scope="session")
def worsened(tmp_path_factory: pytest.TempPathFactory, trained: Trained) -> list[AdapterUpdate]:
    """Four good versions of ``tutor`` (the learnable pairs, a quarter of the events held
    out and evaluated; LoRA on every layer, at the contract servers' highest rank, so that
    four windows of four learn), then v5: a window of random CJK characters (bytes that no
    held-out response has) at ten times the learning rate, on the same evaluation set.
    Real eval losses, measured by the trainer. (Random printable ASCII is no garbage to
    this byte-level model: it teaches which bytes are printable, and the eval loss falls.)"""
    import itertools
    import random

    from aiokafka import TopicPartition

    from lorastream.dev.events import learning_event
    from schemas import LearningEvent
    from trainer.config import LoraSettings, TrainingConfig
    from trainer.core import Trained as Outcome
    from trainer.core import WindowTrainer
    from trainer.lineage import Lineage
    from trainer.window import Windows, held_out

    fraction, size = 0.25, 4
    adapters = tmp_path_factory.mktemp("worsened")
    lineage, windows = Lineage(ADAPTER), Windows(size, fraction)
    tp = TopicPartition("learning-events", 0)

    def core(learning_rate: float) -> WindowTrainer:
        return WindowTrainer.load(
            TrainingConfig(
                adapter_dir=adapters,
                base_model=trained.model_dir,
                base_model_name=str(trained.model_dir),
                window_size=size,
                device="cpu",
                lora=LoraSettings(
                    r=16, alpha=48, target_modules=EVERY_LAYER, learning_rate=learning_rate
                ),
                eval_fraction=fraction,
            )
        )

    def feed(trainer: WindowTrainer, events: list[LearningEvent], until: int) -> None:
        """Offer events from the next offset until version ``until`` is trained."""
        for event in events:
            _, window = windows.offer(tp, next(offsets), event, lineage)
            if window is not None:
                outcome = trainer.train(window, lineage)
                assert isinstance(outcome, Outcome)
                lineage.record(outcome.update)
                windows.settle(window)
                if lineage.version == until:
                    return  # the window just closed: none is open
        raise AssertionError(f"too few events for v{until}")

    offsets = itertools.count()
    feed(core(5e-3), [learning_event(ADAPTER, n) for n in range(60)], until=4)

    rng = random.Random(0)
    garbage = []
    for n in range(40):
        event = learning_event(ADAPTER, 100 + n)
        junk = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(12))
        if not held_out(event.id, fraction):  # the evaluation set stays what it was
            garbage.append(event.model_copy(update={"response": junk}))
    feed(core(5e-2), garbage, until=5)
    return list(lineage.updates)


@pytest.fixture
def versions(trained: Trained, tmp_path: Path) -> list[AdapterUpdate]:
    """This test's own copy of the trained versions (files and announcements)."""
    copies = []
    for update in trained.updates:
        target = tmp_path / "adapters" / update.adapter / f"v{update.version}"
        shutil.copytree(update.uri, target)
        copies.append(update.model_copy(update={"uri": str(target)}))
    return copies


@pytest.fixture(params=["vllm", "sglang"])
async def server(request: pytest.FixtureRequest, trained: Trained) -> AsyncIterator[ContractServer]:
    """A contract server of each kind, serving the tiny model by its path."""
    async with contract_server(request.param, base=str(trained.model_dir)) as running:
        yield running


@pytest.fixture
async def vllm_server() -> AsyncIterator[ContractServer]:
    async with contract_server("vllm") as running:
        yield running


@pytest.fixture
async def sglang_server() -> AsyncIterator[ContractServer]:
    async with contract_server("sglang") as running:
        yield running
