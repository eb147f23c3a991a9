"""The command line against the real broker: produce, topics, help, errors."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from lorastream.dev.workers import LORASTREAM
from schemas import Topics
from tests.kafka_util import read_all


def _run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [LORASTREAM, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["broker"],
        ["broker", "start"],
        ["topics", "create"],
        ["score"],
        ["train"],
        ["produce"],
        ["adapters", "follow"],
        ["adapters", "list"],
        ["replay"],
        ["demo"],
    ],
    ids=lambda c: " ".join(c) or "root",
)
def test_every_command_has_help(command: list[str]) -> None:
    from typer.testing import CliRunner

    from lorastream.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], prog_name="lorastream")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


def test_the_installed_script_runs() -> None:
    """The one help through the real entry point: the installed `lorastream` script."""
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: lorastream ")
    assert "Continual LoRA fine-tuning on Apache Kafka." in result.stdout


def _leaves(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if hasattr(command, "commands"):  # a group (typer vendors its own click)
        return [
            leaf for name, sub in command.commands.items() for leaf in _leaves(sub, (*path, name))
        ]
    return [path]


def test_every_option_that_sets_a_setting_shows_its_variable_and_default() -> None:
    """One source: each option bound to a setting shows that setting's variable and default
    in --help, as rendered (rich markup once ate every "[env: …]")."""
    from typer.main import get_command
    from typer.testing import CliRunner

    from lorastream.cli import app
    from lorastream.settings import Settings, shown_default, variable_of

    root = get_command(app)
    field_of = {"target_modules": "lora_target_modules"}
    checked = 0
    for path in [(), *_leaves(root)]:  # the root's options show in `lorastream --help`
        command: Any = root
        for name in path:
            command = command.commands[name]
        rendered = CliRunner().invoke(app, [*path, "--help"], terminal_width=100)
        assert rendered.exit_code == 0, rendered.output
        text = " ".join(rendered.output.split())
        for param in command.params:
            field = field_of.get(param.name or "", param.name or "")
            if field not in Settings.model_fields:
                continue
            wanted = f"[env: {variable_of(field)}; default: {shown_default(field)}]"
            assert wanted in text, f"lorastream {' '.join(path)} --help lacks {wanted}:\n{text}"
            checked += 1
    assert checked >= 30, checked


def test_the_readme_configuration_table_is_made_from_the_settings() -> None:
    from lorastream.settings import markdown_table

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert markdown_table() in readme, "run `python -m lorastream.settings` and paste its table"


def test_a_bad_setting_is_one_clear_line_not_a_traceback() -> None:
    result = _run("topics", "create", env={"LORASTREAM_WINDOW_SIZE": "many"})
    assert result.returncode == 1
    assert result.stderr.startswith("SettingsError: ")
    assert "LORASTREAM_WINDOW_SIZE" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_topics_create_is_idempotent(kafka_bootstrap: str, prefix: str) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "LORASTREAM_TOPIC_PREFIX": prefix}
    first = _run("topics", "create", "--partitions", "2", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created") == len(Topics().all())
    second = _run("topics", "create", env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("exists") == len(Topics().all())
    for name in Topics.named(prefix).all():
        assert name in second.stdout


@pytest.mark.integration
async def test_produce_reports_bad_lines_by_number_and_produces_the_rest(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "LORASTREAM_TOPIC_PREFIX": prefix}
    assert _run("topics", "create", "--partitions", "1", env=env).returncode == 0
    good = [
        orjson.dumps(
            {
                "id": f"g{i}",
                "adapter": "tutor",
                "prompt": "p",
                "response": "r",
                "entropy_delta": -0.3,
            }
        )
        for i in range(5)
    ]
    lines = [
        good[0],
        b'{"id": "bad", "prompt": "p", "response": "r"}',  # line 2: no entropy
        good[1],
        b"",  # line 4: blank, skipped
        good[2],
        b"not json at all",  # line 6
        good[3],
        b'{"id": "x", "adapter": "a/b", "prompt": "p", "response": "r", "entropy_delta": 1}',  # line 8
        good[4],
    ]
    data = tmp_path / "results.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")

    strict = _run("produce", "--strict", str(data), env=env)
    assert strict.returncode == 1 and "nothing produced" in strict.stderr

    result = _run("produce", str(data), env=env)
    assert result.returncode == 1  # bad lines make the exit status say so
    for number, field in ((2, "$"), (6, "$"), (8, "adapter")):
        assert f"results.jsonl:{number}: invalid GenerationResult: {field}:" in result.stderr, (
            result.stderr
        )
    assert "produced 5" in result.stdout and "3 bad line(s), 1 blank" in result.stdout

    topic = Topics.named(prefix).generation_results
    records = await read_all(kafka_bootstrap, topic, 5, settle=1)
    assert [r.value for r in records] == good  # the lines as written, in order, once
    assert {r.key for r in records} == {b"tutor"}


def test_produce_names_a_missing_file(tmp_path: Path) -> None:
    result = _run("produce", str(tmp_path / "nope.jsonl"))
    assert result.returncode != 0
    assert "nope.jsonl" in result.stderr


def test_train_names_a_base_model_directory_that_is_not_one(tmp_path: Path) -> None:
    done = _run("train", "--base-model", str(tmp_path / "no-model"), timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("BaseModelError: ")
    assert str(tmp_path / "no-model") in done.stderr and "config.json" in done.stderr
    assert "Traceback" not in done.stderr
