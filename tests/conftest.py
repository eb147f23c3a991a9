"""Session fixtures: one real Kafka broker per test run, uuid-named everything.

The broker, in order of preference:

1. ``KAFKA_BOOTSTRAP_SERVERS`` when set (any cluster the caller runs);
2. a testcontainers ``apache/kafka`` container when a Docker engine answers;
3. the local KRaft broker that ``lorastream broker`` assembles from Maven
   Central, on free ports in a temporary home (the jar cache is shared).

Never a mock broker. Under pytest-xdist the controller starts the one broker before the
workers exist and hands it to them through ``KAFKA_BOOTSTRAP_SERVERS``; a run without
xdist starts it on first use. Each test gets its own topic prefix, so tests never see
each other's records, groups or transactional ids, whichever worker runs them.

Every test that uses the broker or S3Proxy is marked ``integration`` from the fixtures it
asks for, so ``pytest -m "not integration"`` (``make unit``) needs neither.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from lorastream.dev.ports import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

KAFKA_IMAGE = "apache/kafka:4.1.1"


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def _container_broker() -> Iterator[str]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    port = free_port()
    container = (
        DockerContainer(KAFKA_IMAGE)
        .with_bind_ports(9092, port)
        .with_env("KAFKA_NODE_ID", "1")
        .with_env("KAFKA_PROCESS_ROLES", "broker,controller")
        .with_env("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093")
        .with_env("KAFKA_ADVERTISED_LISTENERS", f"PLAINTEXT://127.0.0.1:{port}")
        .with_env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
        .with_env(
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        )
        .with_env("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
        .with_env("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
        .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
    )
    with container:
        wait_for_logs(container, "Kafka Server started", timeout=120)
        yield f"127.0.0.1:{port}"


def _local_broker(home: Path) -> Iterator[str]:
    from lorastream.dev.broker import LocalBroker
    from lorastream.settings import default_home
    from tests.kafka_util import start_test_broker

    port = free_port()
    controller = free_port()
    jars = default_home() / "jars"
    broker = LocalBroker(home, port=port, controller_port=controller, heap="512m", jars_dir=jars)
    start_test_broker(broker)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


def _start_broker(stack: ExitStack, home: Path) -> str:
    """Start the run's broker (a container where Docker answers, else the local one); the
    stack stops it."""
    started = _container_broker() if _docker_answers() else _local_broker(home)
    stack.callback(started.close)
    return next(started)


# The fixtures a test asks for (directly or through other fixtures) that need a server.
SERVER_FIXTURES = frozenset({"kafka_bootstrap", "s3", "s3_env"})
# Tests that assert on wall time or memory run one after another on one xdist worker.
TIMED_GROUP = "timed"


def _is_xdist_controller(config: pytest.Config) -> bool:
    workers = getattr(config.option, "numprocesses", None)
    return bool(workers) and not hasattr(config, "workerinput")


def _selects_integration(config: pytest.Config) -> bool:
    return "not integration" not in (config.option.markexpr or "")


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, the controller starts the run's one broker before any worker exists,
    so every worker inherits ``KAFKA_BOOTSTRAP_SERVERS``; pytest_unconfigure stops it."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or not _is_xdist_controller(config):
        return
    if not _selects_integration(config):
        return
    stack = ExitStack()
    home = Path(tempfile.mkdtemp(prefix="lorastream-kafka-"))
    stack.callback(shutil.rmtree, home, ignore_errors=True)
    os.environ["KAFKA_BOOTSTRAP_SERVERS"] = _start_broker(stack, home)
    config.stash[_BROKER] = stack


_BROKER = pytest.StashKey[ExitStack]()


def pytest_unconfigure(config: pytest.Config) -> None:
    stack = config.stash.get(_BROKER, None)
    if stack is not None:
        os.environ.pop("KAFKA_BOOTSTRAP_SERVERS", None)
        stack.close()


# The files whose tests take longest (pytest --durations), slowest first. xdist hands out
# tests in collection order, so these start first and the run does not end waiting for one
# of them; the timed group (one long unit) goes before all.
SLOW_FIRST = (
    "tests/trainer/test_integrity.py",
    "tests/trainer/test_replay_owner.py",
    "tests/test_storm.py",
    "tests/trainer/test_replay.py",
    "tests/trainer/test_rebalance.py",
    "tests/lorastream/test_demo.py",
    "tests/lorastream/test_secure.py",
    "tests/lorastream/test_broker_gone.py",
    "tests/lorastream/test_broker.py",
    "tests/trainer/test_rehearsal_integration.py",
    "tests/trainer/test_instances.py",
    "tests/serving/test_instances.py",
    "tests/streams/test_rouge_parity.py",
    "tests/trainer/test_trainer_integration.py",
    "tests/lorastream/test_inspect.py",
    "tests/trainer/test_eval.py",
    "tests/trainer/test_poison.py",
    "tests/lorastream/test_errors.py",
    "tests/lorastream/test_walk.py",
    "tests/serving/test_capacity.py",
    "tests/lorastream/test_views.py",
    "tests/lorastream/test_s3_command.py",
    "tests/serving/test_general_gate.py",
    "tests/lorastream/test_metrics_scrape.py",
)


# Files whose module-scoped fixture is a run of its own (the demo, a broker with TLS and
# SCRAM, a broker to stop and restart): their tests stay on one worker, so that it runs once.
ONE_WORKER = {
    "tests/lorastream/test_demo.py": "demo",
    "tests/lorastream/test_secure.py": "secure-broker",
    "tests/lorastream/test_broker.py": "local-broker",
    "tests/lorastream/test_broker_gone.py": "broker-gone",
}


def _start_rank(item: pytest.Item) -> int:
    if item.get_closest_marker("timed") is not None:
        return -1
    path = item.nodeid.split("::", 1)[0]
    return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the groups set here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("timed") is not None:
            item.add_marker(pytest.mark.xdist_group(TIMED_GROUP))
        elif item.nodeid.split("::", 1)[0] in ONE_WORKER:
            item.add_marker(pytest.mark.xdist_group(ONE_WORKER[item.nodeid.split("::", 1)[0]]))
    if _is_xdist_worker(config):
        items.sort(key=_start_rank)  # stable: within a rank, the files' own order


def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """On the controller: refuse to run when xdist did not write the groups into the tests'
    ids, as pytest 9.2 with pytest-xdist 3.8 silently does not (pytest-dev/pytest-xdist#1386):
    a demo or a broker per worker, and timed tests racing each other, would pass or fail by
    chance."""
    if node.config.getvalue("dist") != "loadgroup":
        return
    lost = [
        nodeid for nodeid in ids if nodeid.split("::", 1)[0] in ONE_WORKER and "@" not in nodeid
    ]
    if lost:
        pytest.exit(
            f"pytest-xdist did not group {len(lost)} tests (e.g. {lost[0]}): this pytest and "
            "this pytest-xdist do not work together (pytest-dev/pytest-xdist#1386); install "
            "the versions in constraints.txt (make setup)",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bootstrap address of the run's real Kafka broker."""
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given:
        yield given
        return
    with ExitStack() as stack:
        yield _start_broker(stack, tmp_path_factory.mktemp("kafka"))


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3-compatible server (S3Proxy from Maven Central) for the session, started
    the way the broker is; ``s3.bucket(name)`` makes a bucket, ``s3.environment()`` gives
    the AWS_* variables. Its jar is cached beside the broker's."""
    from lorastream.dev.s3proxy import LocalS3
    from lorastream.settings import default_home

    server = LocalS3(tmp_path_factory.mktemp("s3"), jars=default_home() / "s3proxy")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The AWS_* variables of the session's S3Proxy, in this process's environment."""
    for name, value in s3.environment().items():
        monkeypatch.setenv(name, value)
    return s3


@pytest.fixture
def prefix() -> str:
    """A unique topic prefix (and so group and transactional ids) for one test."""
    return f"t{uuid.uuid4().hex[:10]}."
