"""Each command's ``--help`` names every setting that the command reads (#22: ``train
--help`` lacked LORASTREAM_EVAL_FRACTION, _TOKEN_BUDGET, _MAX_LENGTH, _LORA_DROPOUT and
_GRADIENT_CHECKPOINTING).

What a command reads is found in the code, not listed here, so that the list cannot go
stale: from the command's function, every function and class it calls in the CLI, the
operations, the demo and :mod:`lorastream.stages` (which builds every stage's
configuration: the stages themselves never see the settings), transitively, resolved
through each module's names as Python resolves them; in each, every ``settings.NAME``
(or ``….settings.NAME``); a property or method of :class:`Settings` stands for the
fields it reads in turn. A function reached only as a method of an object it was handed
is not followed: the settings reach such code as ``settings`` or ``….settings``, which
the caller's own scan already sees wherever it reads them.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import textwrap
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest

from lorastream.settings import Settings, variable_of

# Where the settings are read: the commands, the operations and the demo they call, and the
# builders of the stages' configurations.
SCANNED = ("lorastream.cli", "lorastream.ops", "lorastream.demo", "lorastream.stages")


def _is_settings(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "settings") or (
        isinstance(node, ast.Attribute) and node.attr == "settings"
    )


@cache
def _settings_members() -> dict[str, ast.FunctionDef]:
    """The properties and methods of Settings, by name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(Settings)))
    cls = tree.body[0]
    assert isinstance(cls, ast.ClassDef)
    return {node.name: node for node in cls.body if isinstance(node, ast.FunctionDef)}


def _fields_behind(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """The fields that ``settings.name`` reads: itself, or those its property reads."""
    if name in Settings.model_fields:
        return {name}
    member = _settings_members().get(name)
    if member is None or name in seen:
        return set()
    fields = set()
    for node in ast.walk(member):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        ):
            fields |= _fields_behind(node.attr, seen | {name})
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            fields |= {node.value} & set(Settings.model_fields)  # getattr(self, "ssl_cafile")
    return fields


def _local_imports(tree: ast.AST) -> dict[str, Any]:
    """What the ``from X import y`` statements inside a function bind."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            module = importlib.import_module(node.module)
            for alias in node.names:
                with contextlib.suppress(AttributeError):
                    bound[alias.asname or alias.name] = getattr(module, alias.name)
    return bound


def _callees(obj: Any, tree: ast.AST) -> Iterator[Any]:
    """The functions and classes of the scanned modules that ``tree`` (``obj``'s source)
    calls, resolved as Python would: a name in the function's own imports or its
    module's globals, or ``module.name``."""
    module = inspect.getmodule(obj)
    names = {**vars(module), **_local_imports(tree)} if module else _local_imports(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, target = node.func, None
        if isinstance(func, ast.Name):
            target = names.get(func.id)
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            base = names.get(func.value.id)
            if inspect.ismodule(base):
                target = getattr(base, func.attr, None)
        if (inspect.isfunction(target) or inspect.isclass(target)) and target.__module__.startswith(
            SCANNED
        ):
            yield target


def reads(callback: Any) -> set[str]:
    """The settings fields that ``callback`` (a command's function) may read."""
    todo = [inspect.unwrap(callback)]
    visited: set[Any] = set()
    fields: set[str] = set()
    while todo:
        obj = todo.pop()
        if obj in visited:
            continue
        visited.add(obj)
        tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_settings(node.value):
                fields |= _fields_behind(node.attr)
        todo.extend(_callees(obj, tree))
    return {f for f in fields if not _internal(f)}


def _internal(field: str) -> bool:
    extra = Settings.model_fields[field].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("internal"))


def _commands() -> list[tuple[tuple[str, ...], Any]]:
    from typer.main import get_command

    from lorastream.cli import app

    found = []

    def walk(command: Any, path: tuple[str, ...]) -> None:
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                walk(sub, (*path, name))
        else:
            found.append((path, command.callback))

    walk(get_command(app), ())
    return found


COMMANDS = _commands()


def test_the_scan_finds_what_train_reads() -> None:
    """The scan itself: train reads its training settings through the stage builders,
    and the connection through the settings' kafka_connection()."""
    train = dict(COMMANDS)[("train",)]
    found = reads(train)
    for field in (
        "eval_fraction",
        "token_budget",
        "max_length",
        "lora_dropout",
        "security_protocol",
    ):
        assert field in found, found


@pytest.mark.parametrize(
    ("path", "callback"), COMMANDS, ids=[" ".join(path) for path, _ in COMMANDS]
)
def test_help_names_every_setting_the_command_reads(path: tuple[str, ...], callback: Any) -> None:
    from typer.testing import CliRunner

    from lorastream.cli import app

    rendered = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert rendered.exit_code == 0, rendered.output
    text = rendered.output
    missing = sorted(variable_of(f) for f in reads(callback) if variable_of(f) not in text)
    assert not missing, f"lorastream {' '.join(path)} --help does not name {missing}"


def test_the_table_of_what_commands_read_names_only_commands_that_exist() -> None:
    from lorastream.cli.reads import READS

    assert set(READS) <= {path for path, _ in COMMANDS}, set(READS) - {p for p, _ in COMMANDS}
