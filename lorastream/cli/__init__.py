"""The ``lorastream`` command line: one script in front of every stage.

Every command reads its configuration through :func:`load_settings`:
flags first, then the environment (the variables in the README), then
defaults. lorastream's own errors print as ``Name: message`` on stderr and
exit 1, here in :func:`main` and nowhere else; anything else is a bug and keeps
its traceback. A reader that closed stdout (``| head``) ends any command quietly
with exit 0, as it ends ``cat``; a ``LORASTREAM_*`` variable that no setting reads
is a warning naming the closest setting.

This module only assembles the commands, one module per group (``pipeline``,
``replay``, ``adapters``, ``broker``, ``inspect``, ``status``, ``serve``,
``demo``); what they share is in :mod:`lorastream.cli.common`, which they import
instead of this package.
"""

from __future__ import annotations

import logging
import os
import select
import sys
from collections.abc import Sequence
from typing import Annotated, NoReturn

# Ctrl-C while the command still imports (seconds on a busy machine) ends it as at any
# other moment: quietly, not with an import's traceback.
try:
    import typer

    from lorastream.cli import adapters, broker, demo, inspect, pipeline, replay, s3, serve, status
    from lorastream.cli.common import err, say
    from lorastream.cli.reads import describe_settings
    from lorastream.settings import help_for, unknown_variables
    from schemas.errors import LorastreamError
except KeyboardInterrupt:  # pragma: no cover - timing
    sys.exit(130)

__all__ = ["app", "main"]

app = typer.Typer(
    name="lorastream",
    help="Continual LoRA fine-tuning on Apache Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Help texts are plain: rich markup would eat every "[env: NAME, default]".
    rich_markup_mode=None,
)


@app.callback()
def _common(
    ctx: typer.Context,
    bootstrap_servers: Annotated[
        str | None,
        typer.Option(
            "--bootstrap-servers",
            "-b",
            help=help_for("bootstrap_servers"),
        ),
    ] = None,
    topic_prefix: Annotated[
        str | None,
        typer.Option(
            "--topic-prefix",
            help=help_for("topic_prefix"),
        ),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option("--log-format", help=help_for("log_format")),
    ] = None,
) -> None:
    ctx.obj = {
        "bootstrap_servers": bootstrap_servers,
        "topic_prefix": topic_prefix,
        "log_format": log_format,
    }


# The order here is the order of `lorastream --help`: the commands, then the groups.
app.command("serve")(serve.serve)
app.command("status")(status.status)
app.command("score")(pipeline.score)
app.command("produce")(pipeline.produce)
app.command("train")(pipeline.train)
app.command("replay")(replay.replay)
app.command("demo")(demo.demo)

topics_app = typer.Typer(help="The pipeline's Kafka topics.", no_args_is_help=True)
topics_app.command("create")(broker.topics_create)
topics_app.command("list")(inspect.topics_list)
topics_app.command("delete")(inspect.topics_delete)

app.add_typer(broker.broker_app, name="broker")
app.add_typer(s3.s3_app, name="s3")
app.add_typer(topics_app, name="topics")
app.add_typer(adapters.adapters_app, name="adapters")
app.add_typer(inspect.dead_letters_app, name="dead-letters")
app.add_typer(inspect.quarantine_app, name="quarantine")
# Last: the settings each command reads beyond its options, at the end of its --help.
describe_settings(app)


_warned = False


def warn_unknown_variables() -> None:
    """One stderr line per ``LORASTREAM_*`` variable no setting reads, once per process: a
    misspelt ``LORASTREAM_WINDOWSIZE=4`` was silently ignored (#22). A warning, not an
    error: a variable a newer version reads, or a wrapper's own, must not stop a command."""
    global _warned
    if _warned:
        return
    _warned = True
    for name, close in unknown_variables():
        hint = f"did you mean {close}? " if close else ""
        say(err, f"warning: {name} is not a lorastream setting ({hint}it is ignored)")


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reader closed it. click (typer's copy) catches the
    BrokenPipeError of a command itself and exits 1, so the pipe is asked, not the
    exception: poll reports POLLERR on a pipe's write end once its read end is closed."""
    try:
        poller = select.poll()
        poller.register(sys.__stdout__.fileno() if sys.__stdout__ else 1, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _stdout_closed() -> NoReturn:
    """End quietly, as the Python docs advise for a closed pipe: stdout points at devnull,
    so that the interpreter's last flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind stdout (a test's buffer)
        pass
    sys.exit(0)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line on ``argv`` (default: the process's arguments), and exit.

    The one place where a :class:`LorastreamError` becomes ``Name: message`` on
    stderr and exit status 1, and where a closed stdout ends a command with 0."""
    # aiokafka logs every failed connection at ERROR before raising; the command reports
    # the failure itself, once (a stage that runs for long turns these logs back on).
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    warn_unknown_variables()
    try:
        if argv is None:
            app()
        else:
            app(args=list(argv), prog_name="lorastream")
    except LorastreamError as exc:
        say(err, f"{type(exc).__name__}: {exc}")
        sys.exit(1)
    except BrokenPipeError:
        _stdout_closed()
    except KeyboardInterrupt:
        # Ctrl-C before a command handles it itself (typer still building the commands,
        # a stage still starting): the shell's status for it, without a traceback.
        sys.exit(130)
    except SystemExit as exit_:
        if exit_.code not in (0, None) and _reader_gone():
            _stdout_closed()
        raise
