"""What every command module of the CLI shares: the two consoles, the settings, the
option types that set a setting, and the logging of a long-lived stage.

Command modules import these from here, never from :mod:`lorastream.cli` itself,
which only assembles the commands: so no module of the CLI imports the package
that imports it.
"""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from lorastream.settings import Settings, help_for, load_settings

__all__ = [
    "AdapterDirOption",
    "BaseModelOption",
    "CompileOption",
    "DeviceOption",
    "LearningRateOption",
    "LoraAlphaOption",
    "LoraROption",
    "MaxTriesOption",
    "MetricsHostOption",
    "MetricsPortOption",
    "SeedOption",
    "StepsPerWindowOption",
    "TargetModulesOption",
    "WindowSizeOption",
    "client_logs_on",
    "err",
    "out",
    "say",
    "settings_of",
    "setup_logging",
]


class _Console(Console):
    """A rich console whose closed pipe is an ordinary :class:`BrokenPipeError`.

    rich's own answer, ``SystemExit(1)`` raised from inside ``print``, went through a
    running event loop as a BaseException: ``quarantine list | head -3`` printed 40
    lines of tracebacks from the async generators it left half-closed (#22). An
    OSError unwinds them normally, and :func:`lorastream.cli.main` ends the command
    quietly."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the reader of this output closed it")


# soft_wrap: a line such as a file:line: report or an announcement stays one line when piped.
out = _Console(soft_wrap=True)
err = _Console(stderr=True, soft_wrap=True)


def say(console: Console, text: str) -> None:
    """``text`` as it is: rich would read ``[...]`` in it as markup and colour numbers."""
    console.print(text, markup=False, highlight=False)


def settings_of(ctx: typer.Context, **flags: Any) -> Settings:
    """The settings for one command: its flags, then the global ones that the app's
    callback put in ``ctx.obj``, then the environment, then the defaults."""
    return load_settings(**(ctx.obj or {}), **flags)


# Options that set a setting take their help from it: its description, variable and default.
WindowSizeOption = Annotated[int | None, typer.Option(help=help_for("window_size"))]
BaseModelOption = Annotated[Path | None, typer.Option(help=help_for("base_model"))]
AdapterDirOption = Annotated[str | None, typer.Option(help=help_for("adapter_dir"))]
MaxTriesOption = Annotated[int | None, typer.Option(help=help_for("max_tries"))]
DeviceOption = Annotated[str | None, typer.Option(help=help_for("device"))]
SeedOption = Annotated[int | None, typer.Option(help=help_for("seed"))]
LearningRateOption = Annotated[float | None, typer.Option(help=help_for("learning_rate"))]
StepsPerWindowOption = Annotated[int | None, typer.Option(help=help_for("steps_per_window"))]
CompileOption = Annotated[
    bool | None, typer.Option("--compile/--no-compile", help=help_for("compile"))
]
LoraROption = Annotated[int | None, typer.Option(help=help_for("lora_r"))]
LoraAlphaOption = Annotated[float | None, typer.Option(help=help_for("lora_alpha"))]
TargetModulesOption = Annotated[str | None, typer.Option(help=help_for("lora_target_modules"))]
MetricsPortOption = Annotated[int | None, typer.Option(help=help_for("metrics_port"))]
MetricsHostOption = Annotated[str | None, typer.Option(help=help_for("metrics_host"))]


def setup_logging(quiet: bool = False, log_format: str = "text") -> None:
    """Log to stderr: through rich on a terminal, else one plain line per record (rich
    would wrap a line at 80 columns in a log file), or one JSON object per line with
    ``log_format="json"``; ``quiet`` for jobs, whose progress is a bar."""
    from rich.logging import RichHandler

    handler: logging.Handler
    if log_format == "json":
        from lorastream.logformat import JsonFormatter

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif err.is_terminal:
        handler = RichHandler(console=err, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, handlers=[handler])
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class _Repeats(logging.Filter):
    """Let one aiokafka record per logger and message template through every ``every``
    seconds: a client that lost its broker logs the same failure dozens of times a second."""

    def __init__(self, every: float = 30.0) -> None:
        super().__init__()
        self.every = every
        self._last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka"):
            return True
        key = (record.name, str(record.msg))
        now = record.created
        if now - self._last.get(key, -self.every) < self.every:
            return False
        self._last[key] = now
        return True


def client_logs_on() -> None:
    """aiokafka's warnings and errors, each kind at most every 30 s, for a running stage."""
    client = logging.getLogger("aiokafka")
    client.setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Repeats) for f in handler.filters):
            handler.addFilter(_Repeats())
