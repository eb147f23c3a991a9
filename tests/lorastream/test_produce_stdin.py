"""``lorastream produce -``: standard input, validated and produced as a file is (#22)."""

from __future__ import annotations

import os
import subprocess

import orjson
import pytest

from lorastream.dev.workers import LORASTREAM
from schemas import Topics
from tests.kafka_util import read_all


def _produce_stdin(data: bytes, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [LORASTREAM, "produce", "-"],
        input=data,
        env={**os.environ, **env},
        capture_output=True,
        timeout=120,
    )


@pytest.mark.integration
async def test_produce_dash_reads_stdin_and_names_bad_lines_stdin_n(
    kafka_bootstrap: str, prefix: str
) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "LORASTREAM_TOPIC_PREFIX": prefix}
    created = subprocess.run(
        [LORASTREAM, "topics", "create", "--partitions", "1"],
        env={**os.environ, **env},
        capture_output=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    good = [
        orjson.dumps(
            {"id": f"s{i}", "adapter": "tutor", "prompt": "p", "response": "r", "entropy_delta": -1}
        )
        for i in range(3)
    ]
    lines = [good[0], b"not json", good[1], b"", good[2]]

    result = _produce_stdin(b"\n".join(lines) + b"\n", env)

    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr  # a bad line: the exit status says so, as for a file
    assert "<stdin>:2: invalid GenerationResult: $:" in stderr
    assert "Traceback" not in stderr
    assert "produced 3" in result.stdout.decode() and "1 bad line(s), 1 blank" in (
        result.stdout.decode()
    )
    records = await read_all(kafka_bootstrap, Topics.named(prefix).generation_results, 3, settle=1)
    assert [r.value for r in records] == good


def test_produce_dash_strict_produces_nothing_from_bad_stdin() -> None:
    """--strict refuses before connecting: no broker is needed to see the refusal."""
    result = subprocess.run(
        [LORASTREAM, "produce", "--strict", "-"],
        input=b'{"id": "x"}\n',
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"},
        capture_output=True,
        timeout=60,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert "<stdin>:1: invalid GenerationResult" in stderr
    assert "nothing produced" in stderr
