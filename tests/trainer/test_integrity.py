"""One bad adapter stops only itself: a changed byte is caught before a step, the adapter is
held (visibly, with its reason), the others go on, and ``adapters repair`` mends it.

On the real broker, with ``lorastream train`` as a real process; the repaired lineage goes
on to the very version an uninterrupted one reaches, bit for bit.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorastream.dev.events import PAIRS, learning_event
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import LORASTREAM, Worker, worker_env
from schemas import AdapterUpdate, Topics, decode, encode
from tests.kafka_util import read_all, wait_for
from trainer import manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


async def _produce(bootstrap: str, topics: Topics, adapters: list[str], ns: range) -> None:
    events = [learning_event(a, n) for n in ns for a in adapters]
    await produce(
        bootstrap, topics.learning_events, [(e.adapter.encode(), encode(e)) for e in events]
    )


async def _updates(bootstrap: str, topics: Topics, expect: int) -> list[AdapterUpdate]:
    records = await read_all(bootstrap, topics.adapter_updates, expect, timeout=180, settle=2)
    return [decode(r.value, AdapterUpdate) for r in records]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LORASTREAM, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def _reference_v2(home: Path) -> str:
    """alpha v2's weights' sha256, trained in this process without Kafka or faults."""
    from trainer.config import LoraSettings
    from trainer.lora import LoraStepper
    from trainer.model import default_tiny_model_dir, load_base_model
    from trainer.store import AdapterStore, sha256_file

    base = load_base_model(default_tiny_model_dir(home), torch.device("cpu"))
    stepper = LoraStepper(base, LoraSettings(), seed=0)
    state = stepper.initial_state()
    for w in range(2):
        state = stepper.step(state, [PAIRS[n % len(PAIRS)] for n in range(w * 16, w * 16 + 16)])
        state = state.state
    store = AdapterStore(home / "reference")
    return sha256_file(
        store.write("alpha", 2, state, stepper, {}).path / "adapter_model.safetensors"
    )


async def test_a_changed_optimizer_byte_holds_that_adapter_alone_until_repaired(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, prefix)
    adapters = tmp_path / "adapters"
    env = worker_env(
        kafka_bootstrap,
        prefix,
        tmp_path / "home",
        LORASTREAM_ADAPTER_DIR=str(adapters),
        LORASTREAM_HOLD_RECHECK_SECONDS="1",
    )
    await _produce(kafka_bootstrap, topics, ["alpha", "beta"], range(16))
    with Worker(["train"], env, tmp_path / "train-1.log") as worker:
        first = await _updates(kafka_bootstrap, topics, 2)
        assert worker.alive(), worker.output()
    alpha_v1 = next(u for u in first if u.adapter == "alpha")
    assert alpha_v1.manifest_sha256 is not None

    # One value of alpha v1's optimizer state changed, as in the report: exp_avg 0.0 → 1e3.
    v1 = Path(alpha_v1.uri)
    optimizer = v1 / "optimizer.safetensors"
    tensors = load_file(optimizer)
    name = next(k for k in sorted(tensors) if "exp_avg" in k)
    tensors[name].view(-1)[0] = 1e3
    save_file(tensors, str(optimizer), metadata={"steps": "1"})
    before = {p.name: p.read_bytes() for p in v1.iterdir() if p.name != "optimizer.safetensors"}

    await _produce(kafka_bootstrap, topics, ["alpha", "beta"], range(16, 32))
    with Worker(["train"], env, tmp_path / "train-2.log") as worker:
        updates = await _updates(kafka_bootstrap, topics, 3)
        # beta goes on to v2; alpha is held, its window waits: no alpha v2 is announced.
        assert sorted((u.adapter, u.version) for u in updates) == [
            ("alpha", 1),
            ("beta", 1),
            ("beta", 2),
        ]
        await wait_for(worker.said("alpha is on hold"), 60, "the hold")
        held = [line for line in worker.output().splitlines() if "alpha is on hold" in line]
        assert len(held) == 1 and str(optimizer) in held[0] and "sha256" in held[0], held
        assert "Traceback" not in worker.output()
        assert worker.alive()

        status = _cli(env, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert str(optimizer) in status.stdout and '"hold":null' in status.stdout.replace(" ", "")
        listed = _cli(env, "adapters", "list")
        assert listed.returncode == 0 and "on hold: alpha" in listed.stdout, listed.stdout

        repaired = _cli(env, "adapters", "repair", "alpha")
        assert repaired.returncode == 0, repaired.stderr
        assert "restored v1 as announced" in repaired.stdout, repaired.stdout
        # The announced v1 is back, bit for bit; the corrupt copy is set aside, not deleted.
        manifest.verify(v1, "alpha v1", alpha_v1.manifest_sha256, alpha_v1.sha256)
        assert all((v1 / n).read_bytes() == data for n, data in before.items())
        assert [p.name.split("-")[0] for p in v1.parent.glob(".v1.corrupt-*")] == [".v1.corrupt"]

        # The trainer lifts the hold by itself and trains the window that waited.
        updates = await _updates(kafka_bootstrap, topics, 4)
        await wait_for(worker.said("the hold is lifted"), 60, "the hold lifted")
    alpha = [u for u in updates if u.adapter == "alpha"]
    assert [u.version for u in alpha] == [1, 2]
    assert alpha[1].sha256 == _reference_v2(tmp_path), "alpha v2 differs from a clean lineage"
    status = _cli(env, "status", "--json")
    assert '"hold":null' in status.stdout.replace(" ", "") and str(optimizer) not in status.stdout


@pytest.mark.parametrize(
    ("variable", "lineage_lora", "new_lora", "said"),
    [
        (
            "LORASTREAM_LORA_R",
            {"r": 8},
            {"r": 16},
            "LORASTREAM_LORA_R is 16, but the lineage was trained with 8",
        ),
        (
            "LORASTREAM_LORA_ALPHA",
            {"alpha": 16},
            {"alpha": 32},
            "LORASTREAM_LORA_ALPHA is 32, but the lineage was trained with 16",
        ),
    ],
)
def test_a_lora_setting_that_differs_from_the_lineage_is_one_line_naming_it(
    tiny_model_dir: Path,
    tmp_path: Path,
    variable: str,
    lineage_lora: dict[str, float],
    new_lora: dict[str, float],
    said: str,
) -> None:
    """The lineage's LoRA settings are its first version's: a trainer configured otherwise
    holds that adapter with one line naming the variable, both values and the way out,
    trains nothing and writes nothing; a new lineage takes the new settings."""
    from tests.trainer.test_core import _core, _windows
    from trainer.config import LoraSettings
    from trainer.core import Trained
    from trainer.exceptions import AdapterHeld
    from trainer.lineage import Lineage

    first, second = _windows("tutor", 2)
    old = _core(tiny_model_dir, tmp_path, lora=LoraSettings(**lineage_lora))  # type: ignore[arg-type]
    lineage = Lineage("tutor")
    outcome = old.train(first, lineage)
    assert isinstance(outcome, Trained)
    lineage.record(outcome.update)

    new = _core(tiny_model_dir, tmp_path, lora=LoraSettings(**new_lora))  # type: ignore[arg-type]
    with pytest.raises(AdapterHeld) as info:
        new.train(second, lineage)
    message = str(info.value)
    assert said in message and "\n" not in message and "replay" in message, message
    assert variable in message
    assert sorted(p.name for p in (tmp_path / "tutor").iterdir()) == ["v1"]  # nothing written
    fresh = Lineage("tutor-new")
    assert isinstance(new.train(second, fresh), Trained)  # a new lineage, the new settings
