"""``lorastream s3 start|stop|status``: a local S3-compatible server to keep adapters in.

The S3Proxy that the tests run (:mod:`lorastream.dev.s3proxy`), run the way
``broker start`` runs Kafka: in ``$LORASTREAM_HOME/s3``, in a session of its own, so that
it outlives the command and Ctrl-C in its terminal; ``start`` prints the line to paste,
as ``broker start --secure`` does.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated

import typer

from lorastream.cli.common import err, out, say, settings_of

if TYPE_CHECKING:
    from lorastream.dev.s3proxy import LocalS3
    from lorastream.settings import Settings

__all__ = ["s3_app"]

s3_app = typer.Typer(
    help="A local S3-compatible server (S3Proxy) for LORASTREAM_ADAPTER_DIR=s3://…",
    no_args_is_help=True,
)

_PORT = 9000
_BUCKET = "lorastream"

PortOption = Annotated[
    int,
    typer.Option(
        "--port", min=1, max=65535, help="The port it listens on, on 127.0.0.1 (start only)."
    ),
]


def _local_s3(settings: Settings, port: int = _PORT) -> LocalS3:
    from lorastream.dev.s3proxy import LocalS3

    # The jar is kept where the tests keep theirs, beside the broker's jars.
    return LocalS3(settings.home / "s3", port=port, jars=settings.home / "s3proxy")


def _bucket_name(value: str) -> str:
    # A bucket is a directory of S3Proxy's data: a name such as ../x must not leave it.
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value):
        raise typer.BadParameter(f"{value!r} is not a bucket name: 3 to 63 of a-z, 0-9, . and -")
    return value


@s3_app.command("start")
def s3_start(
    ctx: typer.Context,
    port: PortOption = _PORT,
    bucket: Annotated[
        str,
        typer.Option(
            help="The bucket it makes for the adapters: 3 to 63 of a-z, 0-9, '.' and '-'.",
            callback=_bucket_name,
        ),
    ] = _BUCKET,
) -> None:
    """Fetch S3Proxy from Maven Central (once), start it, print the exports to paste.

    Its data lives in $LORASTREAM_HOME/s3/data; a second start leaves a running one as
    it is."""
    server = _local_s3(settings_of(ctx), port)
    with err.status("starting S3Proxy (the first start downloads it with Maven)…"):
        endpoint = server.start()
    url = server.bucket(bucket)
    out.print(endpoint)
    say(out, server.client_exports(f"{url}/adapters"))


@s3_app.command("stop")
def s3_stop(ctx: typer.Context) -> None:
    """Stop the local S3Proxy (nothing happens if it is not running); its data stays."""
    stopped = _local_s3(settings_of(ctx)).stop()
    err.print("stopped" if stopped else "not running")


@s3_app.command("status")
def s3_status(ctx: typer.Context) -> None:
    """Say whether the local S3Proxy runs; exit 1 when it does not."""
    status = _local_s3(settings_of(ctx)).status()
    if status.pid is None:
        out.print("not running")
        raise typer.Exit(1)
    say(
        out,
        f"running  pid {status.pid}  {status.endpoint}  data {status.data}  log {status.log_path}",
    )
