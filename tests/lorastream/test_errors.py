"""Every command, on every bad setting and every broker that is not there or does not
answer: one line naming the setting or the servers, a non-zero exit, in bounded time.

The commands run as the user runs them (the installed script, a subprocess), several
at a time: the slow case, a broker that accepts connections and never answers, costs
one client request timeout however many commands try it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.kafka_util import LORASTREAM, Ran

# Every command that talks to Kafka, with the arguments it needs to get that far.
KAFKA_COMMANDS = [
    ["topics", "create"],
    ["topics", "list"],
    ["topics", "delete", "--prefix", "nothing-here.", "--yes"],
    ["score"],
    ["train"],
    ["produce", "{results}"],
    ["adapters", "list"],
    ["adapters", "follow"],
    ["adapters", "fetch", "tutor"],
    ["replay", "--adapter", "tutor", "--into", "tutor-b"],
    ["replay", "--dry-run"],
    ["dead-letters", "list"],
    ["quarantine", "list"],
    ["status"],
    ["serve", "--backend", "vllm", "--url", "http://127.0.0.1:9"],
]
# And those that do not, which still read the settings.
OTHER_COMMANDS = [["broker", "status"], ["broker", "stop"], ["demo"]]

BAD_SETTINGS = [
    ("KAFKA_BOOTSTRAP_SERVERS", "nonsense"),
    ("KAFKA_BOOTSTRAP_SERVERS", "localhost:notaport"),
    ("LORASTREAM_TOPIC_PREFIX", "my run/"),
    ("LORASTREAM_DEVICE", "gpu"),
    ("LORASTREAM_WINDOW_SIZE", "0"),
]


def _run(command: list[str], env: dict[str, str], timeout: float) -> Ran:
    started = time.monotonic()
    done = subprocess.run(
        [LORASTREAM, *command],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Ran(command, done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def _run_all(commands: list[list[str]], env: dict[str, str], timeout: float) -> list[Ran]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda c: _run(c, env, timeout), commands))


@pytest.fixture
def args(tmp_path: Path) -> Iterator[dict[str, str]]:
    results = tmp_path / "results.jsonl"
    results.write_text(
        '{"id": "r1", "adapter": "tutor", "prompt": "p", "response": "r", "entropy_delta": 0.5}\n'
    )
    yield {"results": str(results)}


def _commands(commands: list[list[str]], args: dict[str, str]) -> list[list[str]]:
    return [[part.format(**args) for part in command] for command in commands]


def _isolated(tmp_path: Path, **more: str) -> dict[str, str]:
    env = {
        "LORASTREAM_HOME": str(tmp_path / "home"),
        "LORASTREAM_ADAPTER_DIR": str(tmp_path / "adapters"),
        "LORASTREAM_TOPIC_PREFIX": "errors-test.",
        "COLUMNS": "250",
    }
    return {**env, **more}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("variable", "value"), BAD_SETTINGS, ids=lambda v: str(v))
def test_every_command_names_a_bad_setting_in_one_line(
    variable: str, value: str, args: dict[str, str], tmp_path: Path
) -> None:
    env = _isolated(tmp_path, **{variable: value})
    for ran in _run_all(_commands(KAFKA_COMMANDS + OTHER_COMMANDS, args), env, 60):
        assert ran.returncode == 1, ran
        assert len(ran.lines) == 1, ran
        assert ran.lines[0].startswith("SettingsError: "), ran
        assert variable in ran.lines[0] and repr(value) in ran.lines[0], ran
        assert ran.seconds < 20, ran


def test_every_command_says_in_one_line_that_no_broker_answers(
    args: dict[str, str], tmp_path: Path
) -> None:
    servers = f"127.0.0.1:{_free_port()}"  # nothing listens there
    env = _isolated(tmp_path, KAFKA_BOOTSTRAP_SERVERS=servers)
    for ran in _run_all(_commands(KAFKA_COMMANDS, args), env, 120):
        assert ran.returncode == 1, ran
        assert len(ran.lines) == 1, ran
        assert servers in ran.lines[0] and "Traceback" not in ran.stderr, ran
        assert ran.seconds < 60, ran


def test_a_broker_that_accepts_and_never_answers_is_one_line_in_bounded_time(
    args: dict[str, str], tmp_path: Path
) -> None:
    """The misbehaving case: TCP connects, Kafka never speaks. Bounded by the clients'
    request timeouts (aiokafka's 40 s), then one line, never a hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    servers = f"127.0.0.1:{listener.getsockname()[1]}"
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        env = _isolated(tmp_path, KAFKA_BOOTSTRAP_SERVERS=servers)
        commands = _commands(
            [["topics", "create"], ["adapters", "list"], ["score"], ["produce", "{results}"]],
            args,
        )
        with ThreadPoolExecutor(max_workers=len(commands)) as pool:
            runs = list(pool.map(lambda c: _run(c, env, 150), commands))
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()
    for ran in runs:
        assert ran.returncode == 1, ran
        assert len(ran.lines) == 1, ran
        assert servers in ran.lines[0] and "Traceback" not in ran.stderr, ran
        assert ran.seconds < 100, ran


@pytest.mark.integration
def test_every_stage_on_missing_topics_says_to_create_them(
    kafka_bootstrap: str, prefix: str, args: dict[str, str], tmp_path: Path
) -> None:
    """score used to log "Ignoring missing topic" and idle forever."""
    env = _isolated(
        tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, LORASTREAM_TOPIC_PREFIX=prefix
    )
    commands = [["score"], ["train"], ["adapters", "follow"], ["adapters", "list"]]
    for ran in _run_all(commands, env, 120):
        assert ran.returncode == 1, ran
        assert len(ran.lines) == 1, ran
        assert f"{prefix}" in ran.lines[0] and "lorastream topics create" in ran.lines[0], ran
