"""The one place where Kafka client errors become ours, and clients that always close.

Every command and stage that talks to Kafka through aiokafka does it inside
:func:`kafka_errors`, so a broker that is down, a name that does not resolve
or a request that times out reaches the user as one
:class:`~schemas.errors.KafkaUnavailableError` naming the servers and what
was being done, never as a traceback. :func:`reader` starts a group-less
``read_committed`` consumer and stops it on every path, including a failed
start (aiokafka warns about an unclosed client otherwise).

Every client is made from one :class:`KafkaConnection`: the servers and the
security options together, frozen, turned into aiokafka's keyword arguments only
where a client is built (:meth:`KafkaConnection.options`).

A refused connection (wrong SASL credentials or mechanism, a TLS handshake that
fails) reaches aiokafka's caller only as "Unable to bootstrap", the cause being in
aiokafka's log; :func:`refusal` finds the cause again, and :func:`reader` and
:func:`admin_client` raise it as one :class:`KafkaAuthenticationError`. A client that
is already running never raises at all: it retries forever, logging each failure;
:class:`UntrustedBrokerWatch` reads those logs for a broker whose certificate no longer
verifies (a secure broker restarted with a new CA).

aiokafka's private client is reached here only (:func:`track_topics`,
:func:`send_to_node`), where no public API serves.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka import errors as _errors
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from schemas.errors import KafkaUnavailableError, LorastreamError

__all__ = [
    "KafkaAuthenticationError",
    "KafkaConnection",
    "UntrustedBrokerWatch",
    "admin_client",
    "kafka_errors",
    "reader",
    "refusal",
    "send_to_node",
    "stop_consumer",
    "track_topics",
]

_SASL_REFUSALS = (
    _errors.SaslAuthenticationFailed,
    _errors.AuthenticationFailedError,
    _errors.AuthenticationMethodNotSupported,
    _errors.UnsupportedSaslMechanismError,
    _errors.IllegalSaslStateError,
)


@dataclass(frozen=True)
class KafkaConnection:
    """Where Kafka is and how to reach it: the bootstrap servers and the security options.

    One object travels from the settings to every client instead of the servers and a
    dict of options side by side; frozen so that nobody changes it on the way, the
    password kept out of its repr. ``str()`` is the servers, as messages name them.
    """

    servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    # An SSLContext has no useful equality; two connections differ by their settings.
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    # The CA file the TLS context trusts (KAFKA_SSL_CAFILE), named when the broker's
    # certificate does not verify; None for the system's CAs.
    cafile: str | None = None

    def __str__(self) -> str:
        return self.servers

    @property
    def secured(self) -> bool:
        """Whether the cluster wants TLS or SASL (a refusal is then worth explaining)."""
        return self.security_protocol != "PLAINTEXT"

    def options(self) -> dict[str, Any]:
        """The security options in aiokafka's keyword names, for a client or a connection."""
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password
        if self.ssl_context is not None:
            options["ssl_context"] = self.ssl_context
        return options

    def client_kwargs(self) -> dict[str, Any]:
        """:meth:`options` with ``bootstrap_servers``: all a client's connection arguments."""
        return {"bootstrap_servers": self.servers, **self.options()}


class KafkaAuthenticationError(KafkaUnavailableError):
    """The cluster answered but refused the connection: SASL authentication or TLS failed."""

    def __init__(
        self, servers: str, doing: str, reason: str, *, tls: bool = False, advice: str = ""
    ) -> None:
        self.servers = servers
        self.doing = doing
        self.reason = reason
        check = (
            "KAFKA_SSL_CAFILE and KAFKA_SECURITY_PROTOCOL"
            if tls
            else "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and KAFKA_SASL_MECHANISM"
        )
        what = "TLS handshake failed" if tls else "authentication failed"
        LorastreamError.__init__(
            self,
            f"{doing}: Kafka at {servers} refused the connection, {what}: {reason}. "
            + (advice or f"Check {check}"),
        )


def _untrusted(kafka: KafkaConnection, doing: str, exc: ssl.SSLError) -> KafkaAuthenticationError:
    """The error for a broker whose certificate does not verify against our CAs."""
    trusted = f"KAFKA_SSL_CAFILE ({kafka.cafile})" if kafka.cafile else "the system's CAs"
    advice = (
        f"The broker's certificate is not signed by {trusted}: if the broker's CA changed "
        "(`broker start --secure` makes a new one at each start), point KAFKA_SSL_CAFILE "
        "at the new one and restart"
    )
    return KafkaAuthenticationError(kafka.servers, doing, _reason(exc), tls=True, advice=advice)


async def refusal(kafka: KafkaConnection, doing: str) -> KafkaAuthenticationError | None:
    """Why a secured cluster refused us, after a client failed with "Unable to bootstrap".

    aiokafka logs the cause (a SASL or TLS failure) and raises only that. So, for a
    client with SASL or TLS options, connect once more to the first server the same
    way and return the refusal as our error; None when the cause is something else.
    """
    from aiokafka.conn import create_conn

    if not kafka.secured:
        return None
    host, _, port = kafka.servers.split(",")[0].strip().rpartition(":")
    try:
        conn = await asyncio.wait_for(
            create_conn(host, int(port), **kafka.options()),
            timeout=10,
        )
    except ssl.SSLCertVerificationError as exc:
        return _untrusted(kafka, doing, exc)
    except (*_SASL_REFUSALS, ssl.SSLError) as exc:
        tls = isinstance(exc, ssl.SSLError)
        # aiokafka's broker errors already name themselves: "[Error 58] SaslAuthenticationFailed: …"
        reason = _reason(exc) if tls else str(exc).strip() or type(exc).__name__
        return KafkaAuthenticationError(kafka.servers, doing, reason, tls=tls)
    except (OSError, KafkaError, TimeoutError, ValueError):
        return None
    conn.close()
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(exc).strip()
    name = type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


class UntrustedBrokerWatch(logging.Filter):
    """Gives up on a broker whose certificate stopped verifying, which aiokafka never does.

    A running aiokafka client whose broker comes back with a certificate from another CA
    (a secure local broker makes a new CA at each start) retries forever, logging each
    failed connection at ERROR on the ``aiokafka`` logger and raising nothing: the stage
    would wait for ever, its user seeing nothing. Added to that logger as a filter (it
    passes every record), this counts the failures that are certificate verification
    errors and, at the ``limit``-th, calls ``give_up`` with the one error to report. The
    context cannot be mended in place (it would trust the old CA as well as the new), so
    the stage stops and its supervisor, or its user, starts it again on the new file.
    """

    def __init__(
        self,
        kafka: KafkaConnection,
        doing: str,
        give_up: Callable[[KafkaAuthenticationError], object],
        limit: int = 5,
    ) -> None:
        super().__init__()
        self.kafka = kafka
        self.doing = doing
        self.give_up = give_up
        self.limit = limit
        self.failures = 0
        self._lock = threading.Lock()  # Faust's consumer and producer log from their threads

    def filter(self, record: logging.LogRecord) -> bool:
        failure = _verify_failure(record)
        if failure is not None:
            with self._lock:
                self.failures += 1
                reached = self.failures == self.limit
            if reached:
                self.give_up(_untrusted(self.kafka, self.doing, failure))
        return True


def _verify_failure(record: logging.LogRecord) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error a log record carries (aiokafka logs it as an
    argument: ``Unable connect to node with id %s: %s``), or None."""
    args = record.args if isinstance(record.args, tuple) else ()
    candidates = [*args, record.exc_info[1] if record.exc_info else None]
    for candidate in candidates:
        if isinstance(candidate, BaseException):
            for exc in (candidate, candidate.__cause__, candidate.__context__):
                if isinstance(exc, ssl.SSLCertVerificationError):
                    return exc
    return None


@contextmanager
def kafka_errors(servers: str, doing: str) -> Iterator[None]:
    """Translate aiokafka's errors and timeouts raised inside; anything else passes."""
    try:
        yield
    except (KafkaError, TimeoutError) as exc:
        raise KafkaUnavailableError(servers, doing, _reason(exc)) from exc


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, minus aiokafka's own CancelledError.

    aiokafka 0.14's fetcher cancels its pending fetch tasks on close and awaits them
    without catching their CancelledError, so stopping a consumer whose broker went
    away (a fetch sleeping before a retry) raises CancelledError although nobody
    cancelled us. A cancellation of the caller's own task still propagates.
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


async def _start(
    client: AIOKafkaConsumer | AIOKafkaAdminClient, kafka: KafkaConnection, doing: str
) -> None:
    """Start ``client``; a secured cluster that refuses it is a
    :class:`KafkaAuthenticationError` (aiokafka says only "Unable to bootstrap")."""
    try:
        await client.start()
    except KafkaError as exc:
        refused = await refusal(kafka, doing)
        if refused is not None:
            raise refused from exc
        raise


@asynccontextmanager
async def reader(
    kafka: KafkaConnection, doing: str, **options: Any
) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer without a group (``read_committed`` unless ``options`` say
    otherwise, no auto commit)."""
    servers = kafka.servers
    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers,
        **{
            "enable_auto_commit": False,
            "isolation_level": "read_committed",
            **kafka.options(),
            **options,
        },
    )
    try:
        await _start(consumer, kafka, doing)
        with kafka_errors(servers, doing):
            yield consumer
    except KafkaError as exc:
        raise KafkaUnavailableError(servers, doing, _reason(exc)) from exc
    finally:
        await stop_consumer(consumer)


@asynccontextmanager
async def admin_client(
    kafka: KafkaConnection, doing: str, **options: Any
) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client, closed on every path. A secured cluster that refuses it is a
    :class:`KafkaAuthenticationError`; other Kafka errors pass, for the caller to name."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.servers, **{**options, **kafka.options()})
    try:
        await _start(admin, kafka, doing)
        yield admin
    finally:
        await admin.close()


# ── aiokafka's private client, where no public API serves ──────────────────────


async def track_topics(consumer: AIOKafkaConsumer, topics: list[str]) -> None:
    """Make a started consumer learn ``topics``' metadata now.

    A consumer knows only the topics it was asked about, and ``partitions_for_topic``
    reads what it knows; ``topics()`` fetches metadata into a throw-away copy, so no
    public call adds a topic to the consumer's own metadata and refreshes it."""
    for topic in topics:
        consumer._client.add_topic(topic)
    await consumer._client.force_metadata_update()


async def send_to_node(admin: AIOKafkaAdminClient, node_id: int, request: Any) -> Any:
    """Send ``request`` to broker ``node_id`` and return its response.

    The admin client has no ListOffsets call, and a consumer's ``end_offsets`` learns
    each topic's metadata first (too slow across hundreds of topics): the request goes
    to each leader as it is."""
    return await admin._client.send(node_id, request)
