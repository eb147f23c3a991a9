"""Adapter versions trained once per session by the real core, and the contract servers.

``trained`` holds four versions of ``tutor`` on the built-in tiny model; each test gets
its own copy (``versions``), so that a test may corrupt its files. The contract servers
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


@dataclass(frozen=True)
class Trained:
    model_dir: Path
    updates: list[AdapterUpdate]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from aiokafka import TopicPartition

    from tests.trainer.events import learning_event
    from trainer.core import Trained as Outcome
    from trainer.core import TrainingConfig, WindowTrainer
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
            core.committed(lineage, outcome)
    assert [u.version for u in lineage.updates] == list(range(1, VERSIONS + 1))
    return Trained(model_dir, list(lineage.updates))


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
