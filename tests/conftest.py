"""Session fixtures: one real Kafka broker per test session, uuid-named everything.

The broker, in order of preference:

1. ``KAFKA_BOOTSTRAP_SERVERS`` when set (any cluster the caller runs);
2. a testcontainers ``apache/kafka`` container when a Docker engine answers;
3. the local KRaft broker that ``lorastream broker`` assembles from Maven
   Central, on free ports in a temporary home (the jar cache is shared).

Never a mock broker. Each test gets its own topic prefix, so tests never
see each other's records, groups or transactional ids.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

KAFKA_IMAGE = "apache/kafka:4.1.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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

    port = _free_port()
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
    from lorastream.dev.broker import LocalBroker, default_home

    port = _free_port()
    controller = _free_port()
    jars = default_home() / "jars"
    broker = LocalBroker(home, port=port, controller_port=controller, heap="512m", jars_dir=jars)
    broker.start(timeout=120)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bootstrap address of the session's real Kafka broker."""
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given:
        yield given
    elif _docker_answers():
        yield from _container_broker()
    else:
        yield from _local_broker(tmp_path_factory.mktemp("kafka"))


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3-compatible server (S3Proxy from Maven Central) for the session, started
    the way the broker is; ``s3.bucket(name)`` makes a bucket, ``s3.environment()`` gives
    the AWS_* variables. Its jar is cached beside the broker's."""
    from lorastream.dev.broker import default_home
    from lorastream.dev.s3proxy import LocalS3

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
