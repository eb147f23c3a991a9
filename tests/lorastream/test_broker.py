"""LocalBroker against a real Kafka: lifecycle, a round trip and transactions, no mocks.

One broker for the module, in a temporary home on free ports; the jar cache
is the machine's shared one (``default_home() / "jars"``, as in conftest), so
Maven runs once per machine. The tests run in file order: the last ones stop
the broker and check that stopping is idempotent.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from lorastream.dev.broker import KAFKA_VERSION, BrokerError, LocalBroker, kernel_kill_lines
from lorastream.dev.ports import free_port
from lorastream.settings import default_home
from tests.kafka_util import start_test_broker

pytestmark = pytest.mark.integration

WAIT = 30.0  # seconds for any single Kafka wait; the broker is local


def _broker(home: Path) -> LocalBroker:
    return LocalBroker(
        home, port=free_port(), controller_port=free_port(), jars_dir=default_home() / "jars"
    )


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A started broker; stopped at the end whatever the tests did."""
    local = _broker(tmp_path_factory.mktemp("broker"))
    start_test_broker(local)
    try:
        yield local
    finally:
        local.stop()


async def _create(bootstrap: str, *names: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, num_partitions=1, replication_factor=1) for n in names]
        )
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


async def _read_committed(bootstrap: str, topic: str, expect: int) -> list[bytes]:
    """Every visible value of ``topic`` to a read_committed reader, waiting for ``expect`` of them."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        values: list[bytes] = []
        async with asyncio.timeout(WAIT):
            while len(values) < expect:
                batch = await consumer.getmany(timeout_ms=500)
                values += [r.value for recs in batch.values() for r in recs if r.value is not None]
        # Give anything beyond ``expect`` (an aborted record leaking) a chance to show.
        batch = await consumer.getmany(timeout_ms=1000)
        return values + [r.value for recs in batch.values() for r in recs if r.value is not None]
    finally:
        await consumer.stop()


def test_the_kafka_that_runs_is_the_declared_kafka_version(broker: LocalBroker) -> None:
    """KAFKA_VERSION (what ``status`` reports) is the version of the jars Maven resolved and
    of the broker that runs them, as the broker itself logs it."""
    resolved = sorted(p.name for p in broker.jars_dir.glob("kafka_2.13-*.jar"))
    assert resolved == [f"kafka_2.13-{KAFKA_VERSION}.jar"], resolved
    clients = sorted(p.name for p in broker.jars_dir.glob("kafka-clients-*.jar"))
    assert clients == [f"kafka-clients-{KAFKA_VERSION}.jar"], clients
    logged = re.findall(r"INFO Kafka version: (\S+)", broker.log_path.read_text())
    assert logged and set(logged) == {KAFKA_VERSION}, logged


def test_start_is_idempotent(broker: LocalBroker) -> None:
    status = broker.status()
    assert status.running and status.pid is not None
    assert status.bootstrap == broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert status.kafka_version == KAFKA_VERSION
    assert status.log_path.exists()
    cmdline = Path(f"/proc/{status.pid}/cmdline").read_bytes().split(b"\0")
    assert b"kafka.Kafka" in cmdline and str(broker.config_path).encode() in cmdline

    assert broker.start(timeout=WAIT) == status.bootstrap
    assert broker.status().pid == status.pid
    # A second manager for the same home sees the same broker.
    again = LocalBroker(broker.home, port=broker.port, controller_port=broker.controller_port)
    assert again.status().pid == status.pid


@pytest.mark.timeout(90)
async def test_produce_consume_round_trip(broker: LocalBroker) -> None:
    topic = f"t{uuid.uuid4().hex[:8]}.plain"
    await _create(broker.bootstrap, topic)
    await _produce(broker.bootstrap, topic, [b"a", b"b", b"c"])
    assert await _read_committed(broker.bootstrap, topic, 3) == [b"a", b"b", b"c"]


@pytest.mark.timeout(120)
async def test_transaction_commits_output_and_offsets(broker: LocalBroker) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    source, sink, group = f"{prefix}.in", f"{prefix}.out", f"{prefix}.group"
    await _create(broker.bootstrap, source, sink)
    await _produce(broker.bootstrap, source, [b"x", b"y"])

    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=broker.bootstrap,
        group_id=group,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, transactional_id=f"{prefix}.tx")
    await consumer.start()
    await producer.start()
    try:
        records: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(WAIT):
            while len(records) < 2:
                batch = await consumer.getmany(timeout_ms=500)
                records += [r for recs in batch.values() for r in recs]
        tp = TopicPartition(source, 0)
        async with producer.transaction():
            for record in records:
                assert record.value is not None
                await producer.send(sink, record.value.upper())
            await producer.send_offsets_to_transaction({tp: records[-1].offset + 1}, group)

        with pytest.raises(RuntimeError, match="abort on purpose"):
            async with producer.transaction():
                await producer.send(sink, b"ABORTED")
                raise RuntimeError("abort on purpose")
        # A committed marker after the abort: the reader below must get past it.
        async with producer.transaction():
            await producer.send(sink, b"AFTER")
    finally:
        await producer.stop()
        await consumer.stop()

    assert await _read_committed(broker.bootstrap, sink, 3) == [b"X", b"Y", b"AFTER"]

    checker = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False
    )
    await checker.start()
    try:
        assert await asyncio.wait_for(checker.committed(tp), WAIT) == 2
    finally:
        await checker.stop()


@pytest.mark.timeout(90)
async def test_aborted_transaction_is_invisible(broker: LocalBroker) -> None:
    topic = f"t{uuid.uuid4().hex[:8]}.aborted"
    await _create(broker.bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, transactional_id=f"{topic}.tx")
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"never seen")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(topic, b"seen")
    finally:
        await producer.stop()
    assert await _read_committed(broker.bootstrap, topic, 1) == [b"seen"]


def test_refuses_a_port_taken_by_another_process(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        local = LocalBroker(tmp_path, port=port, controller_port=free_port())
        with pytest.raises(BrokerError, match=rf"port 127\.0\.0\.1:{port} is taken"):
            local.start(timeout=5)
    assert not local.status().running


def test_a_broker_that_dies_while_starting_is_reported(tmp_path: Path) -> None:
    # A heap too small for the JVM to boot: a real, fast death.
    local = LocalBroker(
        tmp_path,
        port=free_port(),
        controller_port=free_port(),
        heap="2m",
        jars_dir=default_home() / "jars",
    )
    with pytest.raises(BrokerError, match="exited while starting") as caught:
        local.start(timeout=WAIT)
    assert str(local.log_path) in str(caught.value)
    assert "Error occurred during initialization of VM" in str(caught.value)
    assert not local.status().running and not local.pid_path.exists()


def test_a_broker_killed_while_starting_is_named(tmp_path: Path) -> None:
    """A log that just stops: the error names the signal (an out-of-memory kill is a
    SIGKILL), so that a broker that was killed does not read as one that failed."""
    local = LocalBroker(
        tmp_path,
        port=free_port(),
        controller_port=free_port(),
        heap="256m",
        jars_dir=default_home() / "jars",
    )
    spawn = local._spawn

    def spawn_and_kill(jars: Path) -> int:
        pid = spawn(jars)
        os.kill(pid, signal.SIGKILL)
        return pid

    local._spawn = spawn_and_kill  # type: ignore[method-assign]
    with pytest.raises(BrokerError, match=r"exited while starting, killed by SIGKILL \(the kernel"):
        local.start(timeout=WAIT)
    assert not local.status().running and not local.pid_path.exists()


def test_the_kernels_word_on_a_killed_broker_is_found_by_its_pid() -> None:
    """The out-of-memory killer's lines about the broker's pid go into the error (from
    ``dmesg``, where it can be read); lines about other pids do not."""
    dmesg = (
        "[ 812.1] oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,"
        "mems_allowed=0,global_oom,task_memcg=/,task=java,pid=17345,uid=0\n"
        "[ 812.2] Out of memory: Killed process 17345 (java) total-vm:4001020kB, "
        "anon-rss:612300kB, file-rss:0kB, shmem-rss:0kB, UID:0 oom_score_adj:0\n"
        "[ 812.3] oom_reaper: reaped process 17345 (java), now anon-rss:0kB\n"
        "[ 900.0] Out of memory: Killed process 173450 (java) total-vm:1kB\n"
        "[ 901.0] oom-kill:constraint=CONSTRAINT_NONE,task=python,pid=1734,uid=0\n"
    )
    lines = kernel_kill_lines(17345, dmesg)
    assert [line.split("]")[0] for line in lines] == ["[ 812.1", "[ 812.2", "[ 812.3"]
    assert kernel_kill_lines(4242, dmesg) == []
    assert kernel_kill_lines(os.getpid()) == []  # the real dmesg (or none): nothing killed us


def test_stale_pid_file_does_not_fool_status(tmp_path: Path) -> None:
    local = _broker(tmp_path)
    # Our own pid: alive, but not kafka.Kafka with this home's config.
    local.pid_path.write_text(f"{os.getpid()}\n")
    status = local.status()
    assert not status.running and status.pid is None
    assert local.stop() is False
    assert not local.pid_path.exists()


def test_stop_is_idempotent(broker: LocalBroker) -> None:
    pid = broker.status().pid
    assert pid is not None
    assert broker.stop() is True
    assert not broker.status().running
    assert not broker.pid_path.exists()
    assert not Path(f"/proc/{pid}").exists()
    assert broker.stop() is False
    # Controlled shutdown ran to the end (SIGTERM, not SIGKILL).
    assert "[BrokerServer id=1] shut down completed" in broker.log_path.read_text()


@pytest.mark.timeout(120)
async def test_restart_keeps_the_data(broker: LocalBroker) -> None:
    topic = f"t{uuid.uuid4().hex[:8]}.kept"
    await asyncio.to_thread(start_test_broker, broker, 120)
    try:
        await _create(broker.bootstrap, topic)
        await _produce(broker.bootstrap, topic, [b"kept"])
    finally:
        await asyncio.to_thread(broker.stop)
    await asyncio.to_thread(start_test_broker, broker, 120)
    try:
        assert await _read_committed(broker.bootstrap, topic, 1) == [b"kept"]
        assert broker.log_path.read_text().count("StorageTool format") == 1
    finally:
        await asyncio.to_thread(broker.stop)


@pytest.mark.timeout(150)
async def test_follow_says_once_that_kafka_went_away_and_gives_up_in_bounded_time(
    broker: LocalBroker,
) -> None:
    """A follower whose broker goes away prints one line about it, not a flood of client
    logs, and exits 1 with one line after --give-up-after, instead of retrying forever."""
    import subprocess
    import sys
    import time

    await asyncio.to_thread(start_test_broker, broker, 120)
    prefix = f"f{uuid.uuid4().hex[:6]}."
    try:
        await _create(broker.bootstrap, f"{prefix}adapter-updates")
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "LORASTREAM_TOPIC_PREFIX": prefix,
        }
        follower = subprocess.Popen(
            [sys.executable, "-m", "lorastream", "adapters", "follow", "--give-up-after", "15"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert follower.stderr is not None
        first = await asyncio.wait_for(asyncio.to_thread(follower.stderr.readline), 60)
        assert "from now: new announcements only" in first and "--from-beginning" in first
    finally:
        await asyncio.to_thread(broker.stop)
    gone = time.monotonic()
    out, rest = await asyncio.to_thread(follower.communicate, timeout=90)
    took = time.monotonic() - gone
    lines = rest.splitlines()
    assert follower.returncode == 1, rest
    assert len(lines) == 2, rest
    assert lines[0].startswith(f"Kafka at {broker.bootstrap} does not answer")
    assert "retrying for up to 15s" in lines[0]
    assert lines[1].startswith("KafkaUnavailableError: following ") and broker.bootstrap in lines[1]
    assert took < 15 + 5 + 10 + 15, took  # give-up time + one probe interval + probe timeout
    assert out == ""
