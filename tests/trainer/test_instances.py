"""Several trainers on one pipeline (#22, finding 2): each takes a transactional id no live
trainer holds, so none fences another; an explicit id a live trainer holds is refused at
start, in one line; and the fenced path, should it ever happen, is one line too."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from lorastream.dev.events import learning_event
from lorastream.dev.lineage_checks import check_trained_once, check_versions, check_windows
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import Worker, worker_env
from schemas import AdapterUpdate, Topics, decode, encode
from tests.kafka_util import read_all, wait_for
from trainer.claims import InstanceClash, claim_instance
from trainer.committed import read_committed_topic
from trainer.config import InstanceId
from trainer.kafka import KafkaConnection

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

TAKEN = re.compile(r"trainer id (\S+) taken")


def _adapters(partitions: int, per_partition: int) -> list[str]:
    """Adapter names whose keys land ``per_partition`` on each partition."""
    partitioner = DefaultPartitioner()
    by_partition: dict[int, list[str]] = {p: [] for p in range(partitions)}
    for i in range(200):
        name = f"team-{i}"
        part = partitioner(name.encode(), list(range(partitions)), list(range(partitions)))
        if len(by_partition[part]) < per_partition:
            by_partition[part].append(name)
    return [name for names in by_partition.values() for name in names]


def _events(adapters: list[str], numbers: range) -> list[tuple[bytes, bytes]]:
    return [(a.encode(), encode(learning_event(a, n))) for n in numbers for a in adapters]


def _taken(worker: Worker) -> str:
    found = TAKEN.search(worker.output())
    assert found, worker.output()[-2000:]
    return found.group(1)


def _trained(worker: Worker) -> int:
    """The windows ``worker`` says it trained (its ``<adapter> vN: ...`` lines)."""
    return len(re.findall(r" v\d+: ", worker.output()))


async def _updates(bootstrap: str, topics: Topics, expect: int) -> list[AdapterUpdate]:
    records = await read_all(bootstrap, topics.adapter_updates, expect, timeout=240, settle=3)
    return [decode(r.value, AdapterUpdate) for r in records]


# ── the claim itself, in this process ────────────────────────────────────────


async def test_default_ids_take_the_first_free_and_a_restart_gets_its_own_back(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    kafka = KafkaConnection(kafka_bootstrap)
    group = f"{prefix}lorastream-trainer"
    auto = InstanceId(f"{prefix}lorastream-trainer-", None, tmp_path / "locks")
    first = await claim_instance(kafka, group, auto, 2.0)
    second = await claim_instance(kafka, group, auto, 2.0)
    assert first.transactional_id.endswith("-0")
    assert second.transactional_id == first.transactional_id[:-1] + "1"
    first.release()  # as the kernel does when the process dies
    again = await claim_instance(kafka, group, auto, 2.0)
    assert again.transactional_id == first.transactional_id
    again.release()
    second.release()


async def test_an_explicit_id_held_on_this_machine_is_refused_naming_the_holder(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    kafka = KafkaConnection(kafka_bootstrap)
    group = f"{prefix}lorastream-trainer"
    explicit = InstanceId(f"{prefix}lorastream-trainer-", "a", tmp_path / "locks")
    held = await claim_instance(kafka, group, explicit, 2.0)
    with pytest.raises(InstanceClash, match=r"trainer-a \(LORASTREAM_INSTANCE_ID=a\).*pid \d+"):
        await claim_instance(kafka, group, explicit, 2.0)
    held.release()


async def test_a_live_member_elsewhere_refuses_an_explicit_id_and_moves_a_default_one_on(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    """Another machine: its lock is not here, its group membership is what shows."""
    kafka = KafkaConnection(kafka_bootstrap)
    topics = await make_topics(kafka_bootstrap, prefix)
    group = f"{prefix}lorastream-trainer"
    auto = InstanceId(f"{prefix}lorastream-trainer-", None, tmp_path / "here")
    mine = await claim_instance(kafka, group, auto, 2.0)
    mine.release()  # the id a default trainer here takes: now held by a "remote" member
    remote = AIOKafkaConsumer(
        topics.learning_events,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        client_id=mine.transactional_id,
    )
    await remote.start()
    try:
        await wait_for(_assigned(remote), 30, "the remote member to join")
        instance = mine.transactional_id.removeprefix(f"{prefix}lorastream-trainer-")
        explicit = InstanceId(auto.prefix, instance, tmp_path / "here")
        with pytest.raises(InstanceClash, match=rf"{re.escape(mine.transactional_id)} on "):
            await claim_instance(kafka, group, explicit, 2.0)
        moved = await claim_instance(kafka, group, auto, 2.0)
        assert moved.transactional_id == mine.transactional_id[:-1] + "1"
        moved.release()
    finally:
        await remote.stop()


def _assigned(consumer: AIOKafkaConsumer) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        await consumer.getmany(timeout_ms=200)
        return bool(consumer.assignment())

    return check


# ── real trainer processes ───────────────────────────────────────────────────


async def test_default_trainers_share_the_partitions_and_a_clashing_id_is_refused(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    adapters = _adapters(partitions=2, per_partition=2)
    topics = await make_topics(kafka_bootstrap, prefix, partitions=2)
    env = worker_env(
        kafka_bootstrap,
        prefix,
        tmp_path / "home",
        LORASTREAM_ADAPTER_DIR=str(tmp_path / "ad"),
    )
    a = Worker(["train"], env, tmp_path / "a.log").start()
    b = Worker(["train"], env, tmp_path / "b.log").start()
    try:
        await wait_for(a.said("windows of 16"), 120, "a to start")
        await wait_for(b.said("windows of 16"), 120, "b to start")
        assert _taken(a) != _taken(b)
        # Rounds of one window per adapter: once both are in the group, both train.
        for rnd in range(3):
            await produce(
                kafka_bootstrap,
                topics.learning_events,
                _events(adapters, range(rnd * 16, rnd * 16 + 16)),
            )
            await _updates(kafka_bootstrap, topics, 4 * (rnd + 1))
        await wait_for(_both_trained(a, b), 120, "both trainers to train a window")

        clash = Worker(
            ["train"],
            {**env, "LORASTREAM_INSTANCE_ID": _taken(a).rsplit("trainer-", 1)[1]},
            tmp_path / "clash.log",
        ).start()
        assert clash.proc is not None
        assert clash.proc.wait(60) != 0
        lines = clash.output().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("InstanceClash: "), clash.output()
        assert _taken(a) in lines[0] and "on this machine (pid" in lines[0]

        before = _trained(a)
        # The next round, with round 0 produced again: the duplicates are logged, not trained.
        await produce(kafka_bootstrap, topics.learning_events, _events(adapters, range(48, 64)))
        await produce(kafka_bootstrap, topics.learning_events, _events(adapters, range(0, 16)))
        updates = await _updates(kafka_bootstrap, topics, 16)
        await wait_for(_skip_lines([a, b], 64), 60, "a skip line for each duplicate")
        assert _trained(a) > before, a.output()[-3000:]  # a was not fenced: it commits on
        assert a.alive() and b.alive(), (a.output()[-2000:], b.output()[-2000:])
    finally:
        a.terminate()
        b.terminate()
    for worker in (a, b):
        assert "Traceback" not in worker.output()
        assert "took over" not in worker.output()
    learning, _ = await read_committed_topic(
        KafkaConnection(kafka_bootstrap), topics.learning_events
    )
    assert check_versions(updates) == []
    assert check_trained_once(updates) == []
    assert check_windows(learning, updates, [], topics.learning_events) == []
    assert sorted((u.adapter, u.version) for u in updates) == sorted(
        (adapter, v) for adapter in adapters for v in range(1, 5)
    )


def _both_trained(a: Worker, b: Worker) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return _trained(a) > 0 and _trained(b) > 0

    return check


SKIP = re.compile(
    r"skipped (\d+) events already trained or in an open window \(re-delivered or read "
    r"again\): \S+\[\d\]@\d+\.\.\d+, ids (team-\d+-0\d\d)"
)


def _skip_lines(workers: list[Worker], at_least: int) -> Callable[[], Awaitable[bool]]:
    """At least ``at_least`` duplicates reported, in lines that each count several."""

    async def check() -> bool:
        found = [m for w in workers for m in SKIP.finditer(w.output())]
        return sum(int(m.group(1)) for m in found) >= at_least and len(found) < at_least

    return check


async def test_a_fenced_trainer_stops_with_one_line_and_no_traceback(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    """The path a clash the claim cannot see would take: a producer registers the id."""
    topics = await make_topics(kafka_bootstrap, prefix)
    env = worker_env(
        kafka_bootstrap,
        prefix,
        tmp_path / "home",
        LORASTREAM_ADAPTER_DIR=str(tmp_path / "ad"),
        LORASTREAM_WINDOW_SIZE="4",
        LORASTREAM_INSTANCE_ID="solo",
    )
    with Worker(["train"], env, tmp_path / "t.log") as trainer:
        await wait_for(trainer.said("windows of 4"), 120, "the trainer to start")
        usurper = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap,
            transactional_id=f"{prefix}lorastream-trainer-solo",
        )
        await usurper.start()
        await usurper.stop()
        await produce(kafka_bootstrap, topics.learning_events, _events(["alpha"], range(4)))
        assert trainer.proc is not None
        assert trainer.proc.wait(120) == 1
    output = trainer.output()
    assert "Traceback" not in output and "never retrieved" not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("TrainerError: another instance took over transactional id "), output
    assert f"{prefix}lorastream-trainer-solo" in last


async def test_a_group_question_waits_out_a_cluster_without_a_coordinator_yet(
    kafka_bootstrap: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh cluster answers the first group question with "no coordinator" while it
    creates __consumer_offsets (seen as a failed trainer start on a new test broker): the
    claim asks again instead of failing the start; a lasting refusal is still one error."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import GroupCoordinatorNotAvailableError

    from schemas.errors import KafkaUnavailableError
    from trainer.claims import group_members

    kafka = KafkaConnection(kafka_bootstrap)
    real = AIOKafkaAdminClient.find_coordinator
    refusals = {"left": 2}

    async def not_yet(self: AIOKafkaAdminClient, group_id: str, *args: object) -> int:
        if refusals["left"] > 0:
            refusals["left"] -= 1
            raise GroupCoordinatorNotAvailableError("not yet")
        return await real(self, group_id, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(AIOKafkaAdminClient, "find_coordinator", not_yet)
    assert await group_members(kafka, f"{prefix}nobody") == []
    assert refusals["left"] == 0

    refusals["left"] = 1000
    with pytest.raises(KafkaUnavailableError, match="GroupCoordinatorNotAvailable"):
        await group_members(kafka, f"{prefix}nobody", within=1.0)
