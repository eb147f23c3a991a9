"""How a long-lived command starts: the one way for ``score``, ``train``, ``replay`` and
``serve`` to check their topics, set up logging, serve their metrics and stop on a
signal.

Each of them did these steps by itself, in nearly the same words; here they are
once, so that a new stage cannot forget one (a stage that idles on a missing topic,
or is killed halfway through a commit on SIGTERM).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from lorastream.cli.common import setup_logging

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from lorastream.settings import Settings

__all__ = ["start_stage", "stop_on_signals"]


def start_stage(
    settings: Settings,
    registry: CollectorRegistry,
    *,
    topics: Sequence[str] = (),
    logs: bool = True,
    quiet: bool = False,
    metrics: bool = True,
) -> None:
    """Get a stage ready to run, in this order: its ``topics`` must exist, logging goes
    to stderr, and ``registry`` is served on LORASTREAM_METRICS_PORT.

    A missing topic or a broker that is down is one error line here, before the stage
    loads anything (Faust would idle forever on a missing topic). ``logs=False`` for a
    stage that sets up its own logging (Faust); ``quiet`` logs warnings only, for a job
    whose progress is a bar. ``metrics=False`` serves nothing even when the port is set:
    a job inside a stage's container would otherwise take that stage's port.
    """
    if topics:
        from lorastream.ops.admin import require_topics

        asyncio.run(require_topics(settings.kafka_connection(), list(topics)))
    if logs:
        setup_logging(quiet=quiet, log_format=settings.log_format)
    if metrics and settings.metrics_port:
        from prometheus_client import start_http_server

        from lorastream.settings import SettingsError

        try:
            start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
        except OSError as exc:  # a port another process holds: one line, not a traceback
            raise SettingsError(
                f"LORASTREAM_METRICS_PORT (metrics_port): cannot serve metrics on "
                f"{settings.metrics_host}:{settings.metrics_port}: {exc.strerror or exc}"
            ) from exc


def stop_on_signals(stop: Callable[[], None]) -> None:
    """From inside the running event loop: SIGTERM and SIGINT call ``stop``, which asks
    the stage to finish what it is doing and return, rather than die halfway through."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
