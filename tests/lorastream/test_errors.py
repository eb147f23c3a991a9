"""Every command, on every bad setting and every broker that is not there or does not
answer: one line naming the setting or the servers, a non-zero exit, in bounded time.

The walk over every command runs in this process, through :func:`lorastream.cli.main`,
the one place where an error becomes its line; each kind of error is also run once as
the user runs it (the installed script, a subprocess), so that the real process path
stays covered. The slow case, a broker that accepts connections and never answers,
runs as subprocesses, several at a time: it costs one client request timeout however
many commands try it.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from lorastream.dev.ports import free_port
from lorastream.dev.workers import LORASTREAM
from tests.kafka_util import Ran

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
    ("LORASTREAM_LEARNING_RATE", "inf"),  # passed every bound, then a traceback (#22)
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


def _run_here(command: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Ran:
    """``command`` through :func:`lorastream.cli.main` in this process, as the script runs
    it: its environment set only for the call, its output captured, its exit status."""
    from lorastream.cli import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    client_level = logging.getLogger("aiokafka").level
    started = time.monotonic()
    code: int | str | None = 0
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        try:
            with redirect_stdout(out), redirect_stderr(err):
                main(command)
        except SystemExit as exit_:
            code = exit_.code
        finally:  # what a command set up for its own process, taken back
            root.handlers[:] = handlers
            root.setLevel(level)
            logging.getLogger("aiokafka").setLevel(client_level)
    returncode = code if isinstance(code, int) else 0 if code is None else 1
    seconds = time.monotonic() - started
    return Ran(command, returncode, out.getvalue(), err.getvalue(), seconds)


def _run_all_here(
    commands: list[list[str]], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> list[Ran]:
    return [_run_here(command, env, monkeypatch) for command in commands]


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


def _is_one_setting_line(ran: Ran, variable: str, value: str) -> None:
    assert ran.returncode == 1, ran
    assert len(ran.lines) == 1, ran
    assert ran.lines[0].startswith("SettingsError: "), ran
    assert variable in ran.lines[0] and repr(value) in ran.lines[0], ran
    assert ran.seconds < 20, ran


@pytest.mark.parametrize(("variable", "value"), BAD_SETTINGS, ids=lambda v: str(v))
def test_every_command_names_a_bad_setting_in_one_line(
    variable: str,
    value: str,
    args: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = _isolated(tmp_path, **{variable: value})
    commands = _commands(KAFKA_COMMANDS + OTHER_COMMANDS, args)
    for ran in _run_all_here(commands, env, monkeypatch):
        _is_one_setting_line(ran, variable, value)


@pytest.mark.timed  # asserts on wall time or memory
def test_the_script_names_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    variable, value = BAD_SETTINGS[0]
    ran = _run(["score"], _isolated(tmp_path, **{variable: value}), 60)
    _is_one_setting_line(ran, variable, value)


def _is_one_no_broker_line(ran: Ran, servers: str) -> None:
    assert ran.returncode == 1, ran
    assert len(ran.lines) == 1, ran
    assert servers in ran.lines[0] and "Traceback" not in ran.stderr, ran
    assert ran.seconds < 60, ran


def test_every_command_says_in_one_line_that_no_broker_answers(
    args: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    servers = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = _isolated(tmp_path, KAFKA_BOOTSTRAP_SERVERS=servers)
    for ran in _run_all_here(_commands(KAFKA_COMMANDS, args), env, monkeypatch):
        _is_one_no_broker_line(ran, servers)


def test_the_script_says_in_one_line_that_no_broker_answers(tmp_path: Path) -> None:
    servers = f"127.0.0.1:{free_port()}"  # nothing listens there
    ran = _run(["topics", "list"], _isolated(tmp_path, KAFKA_BOOTSTRAP_SERVERS=servers), 120)
    _is_one_no_broker_line(ran, servers)


@pytest.mark.timed  # asserts on wall time or memory
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


def _is_one_missing_topics_line(ran: Ran, prefix: str) -> None:
    assert ran.returncode == 1, ran
    assert len(ran.lines) == 1, ran
    assert f"{prefix}" in ran.lines[0] and "lorastream topics create" in ran.lines[0], ran


@pytest.mark.integration
def test_every_stage_on_missing_topics_says_to_create_them(
    kafka_bootstrap: str,
    prefix: str,
    args: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """score used to log "Ignoring missing topic" and idle forever."""
    env = _isolated(
        tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, LORASTREAM_TOPIC_PREFIX=prefix
    )
    commands = [["score"], ["train"], ["adapters", "follow"], ["adapters", "list"]]
    for ran in _run_all_here(commands, env, monkeypatch):
        _is_one_missing_topics_line(ran, prefix)
    _is_one_missing_topics_line(_run(["score"], env, 120), prefix)
