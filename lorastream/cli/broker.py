"""``lorastream broker start|stop|status`` and ``lorastream topics create``: a Kafka to
run on, and the pipeline's topics on it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from lorastream.cli.common import err, out, say, settings_of

if TYPE_CHECKING:
    from lorastream.dev.broker import LocalBroker
    from lorastream.settings import Settings

__all__ = ["broker_app", "topics_create"]

broker_app = typer.Typer(
    help="A local single-node Apache Kafka (KRaft) for machines without Docker.",
    no_args_is_help=True,
)

_SECURE_PORT = 9094


def _local_broker(settings: Settings, port: int | None, secure: bool = False) -> LocalBroker:
    from lorastream.dev.broker import LocalBroker

    if secure:
        # Its own home and ports, beside the plaintext broker: never the same data.
        return LocalBroker(
            settings.home / "broker-secure",
            port=port or _SECURE_PORT,
            controller_port=(port or _SECURE_PORT) + 1,
            secure=True,
        )
    if port is None:
        port = int(settings.bootstrap_servers.split(",")[0].rsplit(":", 1)[-1])
    return LocalBroker(settings.home / "broker", port=port, controller_port=port + 1)


PortOption = Annotated[
    int | None,
    typer.Option(
        "--port",
        help="Listener port (default: the port of KAFKA_BOOTSTRAP_SERVERS, 9092; 9094 with "
        "--secure); the controller uses the next one.",
    ),
]
SecureOption = Annotated[
    bool,
    typer.Option(
        "--secure",
        help="The secured broker (SASL/SCRAM-SHA-512 over TLS, in <home>/broker-secure): "
        "start prints the KAFKA_* exports that every command needs to reach it, and "
        "LORASTREAM_ANNOUNCE_KEY, which signs and checks every announcement.",
    ),
]


@broker_app.command("start")
def broker_start(ctx: typer.Context, port: PortOption = None, secure: SecureOption = False) -> None:
    """Assemble Kafka from Maven Central (once), start it, wait until it answers."""
    broker = _local_broker(settings_of(ctx), port, secure)
    with err.status("starting Kafka (the first start downloads the jars with Maven)…"):
        bootstrap = broker.start()
    out.print(bootstrap)
    if secure:
        say(out, broker.client_exports())


@broker_app.command("stop")
def broker_stop(ctx: typer.Context, port: PortOption = None, secure: SecureOption = False) -> None:
    """Stop the local broker cleanly (nothing happens if it is not running)."""
    stopped = _local_broker(settings_of(ctx), port, secure).stop()
    err.print("stopped" if stopped else "not running")


@broker_app.command("status")
def broker_status(
    ctx: typer.Context, port: PortOption = None, secure: SecureOption = False
) -> None:
    """Say whether the local broker runs; exit 1 when it does not."""
    status = _local_broker(settings_of(ctx), port, secure).status()
    if status.running:
        out.print(
            f"running  pid {status.pid}  {status.bootstrap}  Kafka {status.kafka_version}  log {status.log_path}"
        )
    else:
        out.print(f"not running  ({status.bootstrap}, Kafka {status.kafka_version})")
        raise typer.Exit(1)


def topics_create(
    ctx: typer.Context,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions per topic.")] = 3,
    replication_factor: Annotated[int, typer.Option(min=1, help="Replicas per partition.")] = 1,
) -> None:
    """Create the pipeline's topics; those that exist are left as they are."""
    from lorastream.ops.admin import create_topics, topic_specs

    settings = settings_of(ctx)
    specs = topic_specs(
        settings.topics, partitions, replication_factor, settings.history_retention_ms
    )
    outcome = asyncio.run(create_topics(settings.kafka_connection(), specs))
    for name, what in outcome.items():
        out.print(f"{what:8} {name}")
