"""``lorastream demo``: the whole pipeline once, explained as it runs (the story itself
is :mod:`lorastream.demo`)."""

from __future__ import annotations

from typing import Annotated

import typer

from lorastream.cli.common import out, settings_of

__all__ = ["demo"]


def demo(
    ctx: typer.Context,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 600.0,
    keep: Annotated[
        bool,
        typer.Option(
            "--keep",
            help="Keep the run's topics, adapters, data and logs, and say where they are "
            "(by default all are deleted at the end; the loss picture always stays).",
        ),
    ] = False,
) -> None:
    """Everything on a real Kafka broker, start to finish, explained as it runs: produce,
    score, train, announce, load. Starts the local broker if none answers."""
    from lorastream.demo import run_demo

    run_demo(settings_of(ctx), out, timeout=timeout, keep=keep)
