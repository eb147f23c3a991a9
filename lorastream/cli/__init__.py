"""The ``lorastream`` command line: one script in front of every stage.

Every command reads its configuration through :func:`load_settings`:
flags first, then the environment (the variables in the README), then
defaults. lorastream's own errors print as ``Name: message`` on stderr and
exit 1, here in :func:`main` and nowhere else; anything else is a bug and keeps
its traceback.

This module only assembles the commands, one module per group (``pipeline``,
``replay``, ``adapters``, ``broker``, ``inspect``, ``status``, ``serve``,
``demo``); what they share is in :mod:`lorastream.cli.common`, which they import
instead of this package.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Annotated

import typer

from lorastream.cli import adapters, broker, demo, inspect, pipeline, replay, serve, status
from lorastream.cli.common import err, say
from lorastream.settings import help_for
from schemas.errors import LorastreamError

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
app.add_typer(topics_app, name="topics")
app.add_typer(adapters.adapters_app, name="adapters")
app.add_typer(inspect.dead_letters_app, name="dead-letters")
app.add_typer(inspect.quarantine_app, name="quarantine")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line on ``argv`` (default: the process's arguments), and exit.

    The one place where a :class:`LorastreamError` becomes ``Name: message`` on
    stderr and exit status 1."""
    # aiokafka logs every failed connection at ERROR before raising; the command reports
    # the failure itself, once (a stage that runs for long turns these logs back on).
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        if argv is None:
            app()
        else:
            app(args=list(argv), prog_name="lorastream")
    except LorastreamError as exc:
        say(err, f"{type(exc).__name__}: {exc}")
        sys.exit(1)
