"""How a long-lived command starts: the one way for ``score``, ``train``, ``replay`` and
``serve`` to check their topics, set up logging, serve their metrics and stop on a
signal.

Each of them did these steps by itself, in nearly the same words; here they are
once, so that a new stage cannot forget one (a stage that idles on a missing topic,
or is killed halfway through a commit on SIGTERM).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from lorastream.cli.common import client_logs_on, setup_logging

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from lorastream.settings import Settings
    from trainer.kafka import KafkaAuthenticationError, KafkaConnection

__all__ = [
    "STOP_GRACE",
    "run_cancellable",
    "run_faust_worker",
    "serve_metrics",
    "start_stage",
    "stop_deadline_on_early_signals",
    "stop_on_signals",
    "watch_broker_certificate",
]

# Seconds a stage has, after SIGINT or SIGTERM, to finish what it is doing. A broker that
# went away made `score` take a minute to stop (Faust's and aiokafka's own waits, one after
# the other) and ignore a second signal (#22); past this, the process exits anyway. Nothing
# half-done is committed: an open transaction is aborted by the broker, uncommitted offsets
# are read again.
STOP_GRACE = 6.0  # within the 10 s a stop may take (#22), with room for a loaded machine

_deadline_lock = threading.Lock()
_deadline: threading.Timer | None = None

T = TypeVar("T")


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
    a job inside a stage's container would otherwise take that stage's port; or the stage
    serves them itself later (:func:`serve_metrics`).

    From then on, a broker whose TLS certificate stops verifying (restarted with a new
    CA) ends the process with one line (:func:`watch_broker_certificate`).
    """
    stop_deadline_on_early_signals()
    kafka = settings.kafka_connection()
    if topics:
        from lorastream.ops.admin import require_topics

        run_cancellable(require_topics(kafka, list(topics)))
    if kafka.ssl_context is not None:
        watch_broker_certificate(kafka)
    if logs:
        setup_logging(quiet=quiet, log_format=settings.log_format)
    if metrics:
        serve_metrics(settings, registry)


def serve_metrics(settings: Settings, registry: CollectorRegistry) -> None:
    """Serve ``registry`` on LORASTREAM_METRICS_PORT, if it is set; a port another process
    holds is one line naming the setting. For a stage that must first make sure it is the
    only one of its kind (``serve``): a second one would otherwise be refused for the port
    its twin holds, not for being a twin."""
    if not settings.metrics_port:
        return
    from prometheus_client import start_http_server

    from lorastream.settings import SettingsError

    try:
        start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    except OSError as exc:  # a port another process holds: one line, not a traceback
        raise SettingsError(
            f"LORASTREAM_METRICS_PORT (metrics_port): cannot serve metrics on "
            f"{settings.metrics_host}:{settings.metrics_port}: {exc.strerror or exc}"
        ) from exc


def stop_deadline_on_early_signals(what: str = "the stage") -> None:
    """Until the running stage installs its own handlers (:func:`stop_on_signals`), a
    SIGINT or SIGTERM starts the stop deadline and interrupts as Python does. Without it, a
    signal during start-up (a model loading in a worker thread, which asyncio.run waits
    for) left the process running past the 10 s a stop may take (#22)."""

    def early(signum: int, frame: object) -> None:
        stop_deadline(what)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)  # as a SIGTERM ends a process, with cleanup

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, early)


def run_cancellable(coro: Coroutine[Any, Any, T], what: str = "the stage") -> T:
    """``asyncio.run(coro)`` for a stage's start-up: SIGINT or SIGTERM cancels ``coro``,
    so that its clients close as they would on an error, then ends the command as the
    signal would (KeyboardInterrupt, or SystemExit with 143), and starts the stop
    deadline. Raised inside the running loop instead, the interrupt left tasks pending
    and coroutines unclosed, each a line of noise on stderr (#22)."""
    got: list[int] = []

    async def cancellable() -> T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def on_signal(signum: int, frame: object) -> None:
            stop_deadline(what)
            got.append(signum)
            loop.call_soon_threadsafe(task.cancel)

        before = {signum: signal.signal(signum, on_signal) for signum in _STOP_SIGNALS}
        try:
            return await coro
        finally:
            for signum, handler in before.items():
                signal.signal(signum, handler)

    try:
        return asyncio.run(cancellable())
    except asyncio.CancelledError:
        if not got:
            raise
        if got[0] == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise SystemExit(128 + got[0]) from None


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def watch_broker_certificate(kafka: KafkaConnection) -> None:
    """Exit with one line once the running clients' TLS handshakes keep failing on the
    broker's certificate: aiokafka retries them forever and raises nothing, so the stage
    would wait without end (#22). It exits at once rather than stop cleanly: nothing can
    be committed or flushed without a connection, and an open transaction is aborted by
    the broker. aiokafka logs the failures only once a stage has turned its client logs
    on (:func:`~lorastream.cli.common.client_logs_on`), when it is running."""
    from trainer.kafka import UntrustedBrokerWatch

    watch = UntrustedBrokerWatch(kafka, "reconnecting", _give_up)
    logging.getLogger("aiokafka").addFilter(watch)


def _give_up(error: KafkaAuthenticationError) -> NoReturn:
    _exit_now(f"{type(error).__name__}: {error}")


def stop_on_signals(stop: Callable[[], None], what: str = "the stage") -> None:
    """From inside the running event loop: SIGTERM and SIGINT call ``stop``, which asks
    the stage to finish what it is doing and return, rather than die halfway through;
    if it has not returned :data:`STOP_GRACE` seconds later, the process exits.

    A Python-level handler, not ``loop.add_signal_handler``: that one runs only when the
    loop next turns, and a loop busy for seconds (a trainer decoding its lineages) kept
    the deadline from starting at all (#22). This one runs at the main thread's next
    bytecode, starts the deadline there, and hands ``stop`` to the loop."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int, frame: object) -> None:
        stop_deadline(what)
        loop.call_soon_threadsafe(stop)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)


def stop_deadline(what: str, grace: float = STOP_GRACE) -> None:
    """Exit the process ``grace`` seconds from now, with one line on stderr, unless it has
    ended by then: called on the first stop signal. A thread, not the event loop, keeps
    the time: the loop may be the thing that is stuck."""
    global _deadline
    with _deadline_lock:
        if _deadline is not None:
            return
        _deadline = threading.Timer(grace, _overdue, args=(what, grace))
        _deadline.daemon = True
        _deadline.start()


def _overdue(what: str, grace: float) -> NoReturn:
    _exit_now(
        f"StopTimeout: {what} had not stopped {grace:.0f} s after the signal (a broker that "
        "does not answer?); exiting without waiting for it. Nothing unfinished was committed"
    )


def _exit_now(line: str) -> NoReturn:
    """Print ``line`` and end the process with status 1, from any thread, whatever the
    event loop is doing: no cleanup runs that could wait on the broker."""
    os.write(2, (line.replace("\n", " ") + "\n").encode())
    os._exit(1)


class _QuietStartFailure(logging.Filter):
    """Drop the traceback that Faust's and mode's workers log for a Kafka error they then
    raise: :func:`run_faust_worker` says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiokafka.errors import KafkaError

        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, KafkaError)


def run_faust_worker(app: Any, servers: str, *, loglevel: str, what: str) -> None:
    """Run a Faust app's worker until a signal stops it, within :data:`STOP_GRACE` seconds.

    Faust handles SIGINT and SIGTERM itself; its handlers are wrapped so that the first one
    also starts the deadline. A Kafka error that ends the worker (the broker went away
    between the topics' check and Faust's start) is one
    :class:`~schemas.errors.KafkaUnavailableError`, not Faust's 40-line traceback.

    stdout and stderr stay the process's own: mode's worker would make each ``write()``
    to them one log record, so a traceback printed by a dying thread (or anything else
    printed) filled the log one token per line (#22)."""
    import faust

    from trainer.kafka import kafka_errors

    class Worker(faust.Worker):
        def _on_sigint(self) -> None:
            stop_deadline(what)
            super()._on_sigint()

        def _on_sigterm(self) -> None:
            stop_deadline(what)
            super()._on_sigterm()

        async def on_startup_finished(self) -> None:
            await super().on_startup_finished()
            # Joined, as for the trainer: the client's own connection trouble is now
            # worth a log line, each kind at most every 30 s.
            client_logs_on()

    quiet = _QuietStartFailure()
    for name in ("mode.worker", "faust.worker", "faust.app.base"):
        logging.getLogger(name).addFilter(quiet)
    worker = Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    with kafka_errors(servers, what):
        worker.execute_from_commandline()
