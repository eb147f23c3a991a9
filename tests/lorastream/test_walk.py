"""The one-line promise, walked: every command, every setting with hostile values, an
unknown LORASTREAM_* name, a closed stdout, and a stop signal at a random moment.

The commands are listed from the typer app, so a new command is walked without being
named here; one with required arguments needs its arguments in :data:`ARGUMENTS`. The
settings walk runs in this process through :func:`lorastream.cli.main` (about 40 ms a
run): every hostile value of every setting once, rotated across the commands, and the
kinds named by #22 (inf, a wrong SASL mechanism, a missing CA file, an unknown name)
through every command. What needs a process of its own (a closed pipe, a signal) runs
as subprocesses. A broker that is down or never answers is walked in test_errors.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main

from lorastream.cli import app
from lorastream.dev.process import kill_group, signal_group, start_group
from lorastream.dev.workers import LORASTREAM
from lorastream.settings import Settings, SettingsError, load_settings, variable_of
from tests.kafka_util import Ran
from tests.lorastream.test_errors import _isolated, _run_here

# Arguments a command needs to get as far as its settings; "{results}" is a file.
ARGUMENTS: dict[tuple[str, ...], list[str]] = {
    ("serve",): ["--backend", "vllm", "--url", "http://127.0.0.1:9"],
    ("produce",): ["{results}"],
    ("topics", "delete"): ["--prefix", "nothing-here.", "--yes"],
    ("adapters", "repair"): ["tutor"],
    ("adapters", "fetch"): ["tutor"],
    ("adapters", "forgetting"): ["tutor"],
    ("dead-letters", "export"): ["{out}"],
    ("quarantine", "retry"): ["--adapter", "tutor"],
}


def _walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if hasattr(command, "list_commands"):
        for name in command.list_commands(None):
            yield from _walk(command.get_command(None, name), (*path, name))
    else:
        yield path


COMMANDS = list(_walk(typer.main.get_command(app)))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    results = tmp_path / "results.jsonl"
    results.write_text(
        '{"id": "r1", "adapter": "tutor", "prompt": "p", "response": "r", "entropy_delta": 0.5}\n'
    )
    return {"results": str(results), "out": str(tmp_path / "out.jsonl")}


def _argv(path: tuple[str, ...], files: dict[str, str]) -> list[str]:
    return [*path, *(part.format(**files) for part in ARGUMENTS.get(path, []))]


def _hostile_values(field: str) -> list[str]:
    """inf, nan, negative and empty for every setting; a missing file for the files; a
    wrong mechanism for the SASL mechanism."""
    values = ["inf", "nan", "-1", ""]
    annotation = str(Settings.model_fields[field].annotation)
    if "Path" in annotation:
        values.append("/nonexistent/walk.pem")
    if field == "sasl_mechanism":
        values.append("GSSAPI")
    return values


def _rejected() -> list[tuple[str, str]]:
    """Each (variable, hostile value) that the settings refuse; the others are values a
    setting may take (an empty prefix, a negative entropy threshold)."""
    cases = []
    for field in Settings.model_fields:
        for value in _hostile_values(field):
            try:
                with pytest.MonkeyPatch.context() as patch:
                    patch.setenv(variable_of(field), value)
                    load_settings()
            except SettingsError:
                cases.append((variable_of(field), value))
    return cases


REJECTED = _rejected()
# What #22 found, by kind: each must be among the refused, and goes through every command.
MUST_REFUSE = [
    ("LORASTREAM_LEARNING_RATE", "inf"),
    ("LORASTREAM_MAX_WAIT_SECONDS", "nan"),
    ("LORASTREAM_WINDOW_SIZE", "-1"),
    ("KAFKA_SASL_MECHANISM", "GSSAPI"),
    ("KAFKA_SSL_CAFILE", "/nonexistent/walk.pem"),
    ("LORASTREAM_METRICS_PORT", ""),
]


def _one_setting_line(ran: Ran, variable: str, value: str) -> None:
    lines = [line for line in ran.lines if not line.startswith("warning: LORASTREAM_")]
    assert ran.returncode == 1, ran
    assert len(lines) == 1, ran
    assert lines[0].startswith("SettingsError: ") and variable in lines[0], ran
    assert "Traceback" not in ran.stderr, ran
    if variable not in ("KAFKA_SASL_PASSWORD", "LORASTREAM_ANNOUNCE_KEY"):  # secrets
        assert repr(value) in lines[0], ran


def test_the_walk_finds_every_command_and_what_must_be_refused() -> None:
    assert ("score",) in COMMANDS and ("quarantine", "list") in COMMANDS
    assert len(COMMANDS) >= 20
    for case in MUST_REFUSE:
        assert case in REJECTED, case
    # inf and nan for every number, whatever its bounds
    numbers = [f for f, i in Settings.model_fields.items() if "float" in str(i.annotation)]
    for field in numbers:
        assert (variable_of(field), "inf") in REJECTED, field
        assert (variable_of(field), "nan") in REJECTED, field


def test_every_hostile_setting_is_one_line_from_some_command(
    files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every refused (setting, value), each through the next command in turn."""
    for n, (variable, value) in enumerate(REJECTED):
        path = COMMANDS[n % len(COMMANDS)]
        env = _isolated(tmp_path, **{variable: value})
        _one_setting_line(_run_here(_argv(path, files), env, monkeypatch), variable, value)


@pytest.mark.parametrize(("variable", "value"), MUST_REFUSE, ids=lambda v: str(v))
def test_every_command_says_what_22_found_in_one_line(
    variable: str,
    value: str,
    files: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = _isolated(tmp_path, **{variable: value})
    for path in COMMANDS:
        _one_setting_line(_run_here(_argv(path, files), env, monkeypatch), variable, value)


def test_every_command_warns_of_an_unknown_name_with_the_closest_one(
    files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LORASTREAM_WINDOWSIZE=4 was silently ignored (#22). A bad server makes each command
    end at once after the warning."""
    import lorastream.cli

    env = _isolated(tmp_path, LORASTREAM_WINDOWSIZE="4", KAFKA_BOOTSTRAP_SERVERS="nonsense")
    for path in COMMANDS:
        monkeypatch.setattr(lorastream.cli, "_warned", False)  # once per process
        ran = _run_here(_argv(path, files), env, monkeypatch)
        assert ran.returncode == 1, ran
        assert len(ran.lines) == 2, ran
        assert ran.lines[0] == (
            "warning: LORASTREAM_WINDOWSIZE is not a lorastream setting "
            "(did you mean LORASTREAM_WINDOW_SIZE? it is ignored)"
        ), ran
        assert ran.lines[1].startswith("SettingsError: ") and "nonsense" in ran.lines[1], ran


def test_the_warning_is_said_once_per_process(
    files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lorastream.cli

    monkeypatch.setattr(lorastream.cli, "_warned", False)
    env = _isolated(tmp_path, LORASTREAM_WINDOWSIZE="4", KAFKA_BOOTSTRAP_SERVERS="nonsense")
    first = _run_here(["topics", "list"], env, monkeypatch)
    second = _run_here(["topics", "list"], env, monkeypatch)
    assert sum("LORASTREAM_WINDOWSIZE" in line for line in first.lines) == 1, first
    assert not any("LORASTREAM_WINDOWSIZE" in line for line in second.lines), second


# ── a closed stdout ───────────────────────────────────────────────────────────


def _closed_pipe(argv: list[str], env: dict[str, str], read: int) -> tuple[int, str]:
    """Run ``argv`` with stdout a pipe whose reader takes ``read`` bytes, then closes it."""
    proc = subprocess.Popen(
        [LORASTREAM, *argv],
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    if read:
        proc.stdout.read(read)
    proc.stdout.close()
    try:
        stderr = proc.stderr.read().decode()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr


@pytest.mark.integration
def test_a_closed_stdout_ends_a_command_quietly(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    """`quarantine list | head -3` printed 40 lines of tracebacks (#22)."""
    import asyncio

    from aiokafka import AIOKafkaProducer

    env = _isolated(
        tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, LORASTREAM_TOPIC_PREFIX=prefix
    )
    created = subprocess.run(
        [LORASTREAM, "topics", "create"], env={**os.environ, **env}, capture_output=True
    )
    assert created.returncode == 0, created

    async def fill() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            for n in range(2000):  # far more than a pipe's 64 KiB buffer
                await producer.send(f"{prefix}learning-events.quarantine", b"not json %d" % n)
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(fill())
    for argv, read in ((["quarantine", "list"], 200), (["quarantine", "list", "--json"], 0)):
        code, stderr = _closed_pipe(argv, env, read)
        assert code == 0 and stderr == "", (argv, code, stderr)


def test_a_closed_stdout_ends_help_quietly(tmp_path: Path) -> None:
    code, stderr = _closed_pipe(["--help"], _isolated(tmp_path), 0)
    assert code == 0 and "Traceback" not in stderr, (code, stderr)


# ── a stop signal at a random moment ─────────────────────────────────────────

LONG_RUNNING = [
    ["score"],
    ["train"],
    ["serve", "--backend", "vllm", "--url", "http://127.0.0.1:9"],
    ["replay", "--adapter", "tutor", "--into", "tutor-b"],
]


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_every_long_running_command_stops_within_10_s_of_a_signal(
    signum: int, kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    """Ctrl-C on `score` took a minute and printed a traceback (#22). Each command gets the
    signal at a random moment of its first seconds: starting, loading, or running."""
    env = {
        **os.environ,
        **_isolated(
            tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, LORASTREAM_TOPIC_PREFIX=prefix
        ),
        "LORASTREAM_WINDOW_SIZE": "4",
    }
    created = subprocess.run([LORASTREAM, "topics", "create"], env=env, capture_output=True)
    assert created.returncode == 0, created
    rng = random.Random()
    procs = []
    for n, argv in enumerate(LONG_RUNNING):
        log = tmp_path / f"{n}.log"
        procs.append((argv, log, start_group([LORASTREAM, *argv], log=log, env=env)))
    try:
        waited = {n: rng.uniform(0.5, 8.0) for n in range(len(procs))}
        started = time.monotonic()
        stopped: dict[int, float] = {}
        for n in sorted(waited, key=waited.__getitem__):
            time.sleep(max(0.0, started + waited[n] - time.monotonic()))
            signal_group(procs[n][2], signum)
            stopped[n] = time.monotonic()
        for n, (argv, log, proc) in enumerate(procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, stopped[n] + 10 - time.monotonic()))
            text = log.read_text(errors="replace")
            assert proc.returncode is not None, (argv, "still running 10 s after", text)
            assert "Traceback" not in text, (argv, text)
    finally:
        for _, _, proc in procs:
            kill_group(proc)
