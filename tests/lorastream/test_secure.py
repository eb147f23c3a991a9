"""The secured local broker (``lorastream broker start --secure``): SASL/SCRAM-SHA-512
over TLS, and every command reaching it through the documented KAFKA_* variables.

One broker for the module, started through the same code as the CLI command, on
free ports in a temporary home (the jar cache is shared), stopped at the end.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.helpers import create_ssl_context

from lorastream.dev.broker import LocalBroker, kafka_answers
from lorastream.dev.ports import free_port
from lorastream.dev.secure import client_ssl_context
from lorastream.dev.workers import LORASTREAM, Worker, worker_env
from lorastream.settings import default_home
from schemas import Topics
from tests.kafka_util import Ran, start_test_broker, wait_for

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Secure:
    broker: LocalBroker
    exports: dict[str, str]
    root: Path

    def env(self, prefix: str, **more: str) -> dict[str, str]:
        return {
            **worker_env(self.exports["KAFKA_BOOTSTRAP_SERVERS"], prefix, self.root / "home"),
            **self.exports,
            "LORASTREAM_ADAPTER_DIR": str(self.root / "adapters"),
            "COLUMNS": "250",
            **more,
        }

    def run(self, prefix: str, *args: str, timeout: float = 60, **more: str) -> Ran:
        started = time.monotonic()
        done = subprocess.run(
            [LORASTREAM, *args],
            env={**os.environ, **self.env(prefix, **more)},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return Ran(args, done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def _parse_exports(line: str) -> dict[str, str]:
    words = shlex.split(line)
    assert words[0] == "export", line
    return dict(word.split("=", 1) for word in words[1:])


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    root = tmp_path_factory.mktemp("secure")
    port = free_port()
    broker = LocalBroker(
        root / "broker-secure",
        port=port,
        controller_port=free_port(),
        heap="512m",
        jars_dir=default_home() / "jars",
        secure=True,
    )
    start_test_broker(broker)
    try:
        yield Secure(broker, _parse_exports(broker.client_exports()), root)
    finally:
        broker.stop()


@pytest.fixture
def prefix() -> str:
    return f"s{uuid.uuid4().hex[:10]}."


def _results(path: Path, count: int) -> Path:
    lines = [
        f'{{"id": "r{i}", "adapter": "tutor", "prompt": "question {i}", '
        f'"response": "answer number {i}", "entropy_delta": 0.5}}'
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_broker_speaks_only_tls_and_keeps_its_secrets_private(secure: Secure) -> None:
    files = secure.broker.secure
    assert files is not None
    bootstrap = secure.broker.bootstrap
    assert kafka_answers(bootstrap, ssl_context=client_ssl_context(files))
    assert not kafka_answers(bootstrap)  # plaintext gets no answer
    for secret in (
        files.sasl_password_file,
        files.store_password_file,
        files.announce_key_file,
        files.keystore,
        secure.broker.config_path,
    ):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert secure.exports == {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "lorastream",
        "KAFKA_SASL_PASSWORD": files.sasl_password(),
        "KAFKA_SSL_CAFILE": str(files.ca_pem),
        "LORASTREAM_ANNOUNCE_KEY": files.announce_key(),
    }
    assert len(secure.exports["LORASTREAM_ANNOUNCE_KEY"]) == 64
    assert secure.broker.status().running


def test_the_commands_work_with_the_exports(secure: Secure, prefix: str, tmp_path: Path) -> None:
    results = _results(tmp_path / "results.jsonl", 3)
    created = secure.run(prefix, "topics", "create", "--partitions", "1")
    assert created.returncode == 0, created
    assert f"{prefix}generation-results" in created.stdout, created
    produced = secure.run(prefix, "produce", str(results))
    assert produced.returncode == 0, produced
    assert "produced 3" in produced.stdout + produced.stderr, produced
    for args in (("status",), ("adapters", "list"), ("dead-letters", "list"), ("topics", "list")):
        ran = secure.run(prefix, *args)
        assert ran.returncode == 0, ran
        assert "Traceback" not in ran.stderr, ran


async def _announced(secure: Secure, topic: str) -> int:
    exports = secure.exports
    consumer = AIOKafkaConsumer(
        bootstrap_servers=exports["KAFKA_BOOTSTRAP_SERVERS"],
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username=exports["KAFKA_SASL_USERNAME"],
        sasl_plain_password=exports["KAFKA_SASL_PASSWORD"],
        ssl_context=create_ssl_context(cafile=exports["KAFKA_SSL_CAFILE"]),
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        ends = await consumer.end_offsets([tp])
        return int(ends[tp])
    finally:
        await consumer.stop()


async def test_score_and_train_announce_a_version(
    secure: Secure, prefix: str, tmp_path: Path
) -> None:
    assert secure.run(prefix, "topics", "create", "--partitions", "1").returncode == 0
    topics = Topics.named(prefix)
    env = secure.env(prefix, LORASTREAM_WINDOW_SIZE="4", LORASTREAM_EVAL_FRACTION="0")
    with (
        Worker(["score"], env, tmp_path / "score.log") as scorer,
        Worker(["train"], env, tmp_path / "train.log") as trainer,
    ):
        produced = secure.run(prefix, "produce", str(_results(tmp_path / "r.jsonl", 4)))
        assert produced.returncode == 0, produced

        async def announced() -> bool:
            assert scorer.alive(), scorer.output()
            assert trainer.alive(), trainer.output()
            return await _announced(secure, topics.adapter_updates) >= 1

        await wait_for(announced, 90, "an adapter version announced over SASL_SSL")
    listed = secure.run(prefix, "adapters", "list")
    assert listed.returncode == 0 and "tutor" in listed.stdout, listed
    planned = secure.run(prefix, "replay", "--dry-run")
    assert planned.returncode == 0 and "Traceback" not in planned.stderr, planned
    # serve reads the lineage over SASL_SSL before it ever reaches the (absent) server.
    serve = ["serve", "--backend", "vllm", "--url", "http://127.0.0.1:9"]
    with Worker(serve, env, tmp_path / "serve.log") as server:
        await wait_for(server.said("lineage read from"), 30, "serve reading the lineage")
        assert server.alive(), server.output()
        assert "Traceback" not in server.output(), server.output()


@pytest.mark.parametrize(
    "command",
    [("status",), ("produce", "{results}"), ("adapters", "list"), ("score",), ("train",)],
    ids=lambda c: "-".join(c[:1]) + ("-" + c[1] if c[1:2] == ("list",) else ""),
)
def test_a_wrong_password_is_one_line(
    secure: Secure, prefix: str, tmp_path: Path, command: tuple[str, ...]
) -> None:
    results = _results(tmp_path / "results.jsonl", 1)
    args = [part.format(results=results) for part in command]
    ran = secure.run(prefix, *args, timeout=60, KAFKA_SASL_PASSWORD="not-the-password")
    assert ran.returncode == 1, ran
    assert len(ran.lines) == 1, ran
    assert "Traceback" not in ran.stderr, ran
    assert ran.seconds < 30, ran
    assert "KafkaAuthenticationError" in ran.lines[0], ran
    assert "authentication failed" in ran.lines[0], ran
    assert "SaslAuthenticationFailed" in ran.lines[0], ran


def test_the_secure_home_is_not_taken_for_a_plaintext_broker(secure: Secure) -> None:
    """The same home started without --secure must not wait on plaintext and then stop it."""
    from lorastream.dev.broker import BrokerError

    plain = LocalBroker(
        secure.broker.home, port=secure.broker.port, controller_port=secure.broker.controller_port
    )
    with pytest.raises(BrokerError, match="SASL_SSL listener"):
        plain.start(timeout=5)
    assert secure.broker.status().running


async def _exited(worker: Worker, within: float, what: str) -> int:
    """The worker's exit status, once it has exited by itself within ``within`` s."""

    async def gone() -> bool:
        return not worker.alive()

    await wait_for(gone, within, what)
    assert worker.proc is not None
    return worker.proc.wait()


async def test_a_new_ca_ends_score_and_train_in_one_line(
    secure: Secure, prefix: str, tmp_path: Path
) -> None:
    """#22: after ``broker start --secure`` restarted with a new CA, ``score`` and ``train``
    retried for ever and ignored the signals. Now each exits, in one line that names
    KAFKA_SSL_CAFILE. Last in the file: it restarts the module's broker."""
    files = secure.broker.secure
    assert files is not None
    assert secure.run(prefix, "topics", "create", "--partitions", "1").returncode == 0
    topics = Topics.named(prefix)
    env = secure.env(prefix)
    with (
        Worker(["score"], env, tmp_path / "score.log") as scorer,
        Worker(["train"], env, tmp_path / "train.log") as trainer,
    ):
        produced = secure.run(prefix, "produce", str(_results(tmp_path / "r.jsonl", 1)))
        assert produced.returncode == 0, produced

        async def scored() -> bool:
            assert scorer.alive(), scorer.output()
            return await _announced(secure, topics.learning_events) >= 1

        await wait_for(scored, 90, "a result scored over SASL_SSL")
        await wait_for(trainer.said("wrote the snapshots"), 90, "the trainer running")
        old_ca = files.ca_pem.read_bytes()
        secure.broker.stop()
        start_test_broker(secure.broker, 120)
        assert files.ca_pem.read_bytes() != old_ca
        for name, worker in (("score", scorer), ("train", trainer)):
            status = await _exited(worker, 60, f"{name} giving up on the new CA")
            log = worker.output()
            assert status == 1, (name, log)
            assert "Traceback" not in log, (name, log)
            refusals = [line for line in log.splitlines() if "KafkaAuthenticationError" in line]
            assert len(refusals) == 1, (name, log)
            assert log.rstrip().splitlines()[-1] == refusals[0], (name, log)
            assert refusals[0].startswith("KafkaAuthenticationError: reconnecting: "), refusals
            assert "certificate verify failed" in refusals[0], refusals
            assert f"KAFKA_SSL_CAFILE ({files.ca_pem})" in refusals[0], refusals
            assert "if the broker's CA changed" in refusals[0], refusals
