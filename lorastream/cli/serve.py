"""``lorastream serve``: every new adapter version goes live in an inference server.

The loop is :class:`lorastream.serving.Serve`; the proxy (``--listen``) is
:class:`lorastream.serving.proxy.Proxy`; its configuration is
:func:`lorastream.stages.serve_config`. ``lorastream.cli`` registers :func:`serve`.
"""

from __future__ import annotations

import asyncio
import re
from typing import Annotated

import typer

from lorastream.settings import help_for
from schemas import ADAPTER_PATTERN

__all__ = ["serve"]

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(f"{value!r} is not HOST:PORT", param_hint="--listen")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve(
    ctx: typer.Context,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            metavar="vllm|sglang",
            help="The inference server: vllm (VLLM_ALLOW_RUNTIME_LORA_UPDATING=true, "
            "--enable-lora) or sglang (--enable-lora).",
            case_sensitive=False,
        ),
    ],
    url: Annotated[
        str,
        typer.Option(
            "--url", metavar="URL", help="The inference server's base URL, e.g. http://gpu:8000."
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            metavar="NAME",
            help="What this serve's consumer group (<prefix>lorastream-serve-NAME) and its "
            "lock are named after, instead of --url: give the same name wherever one server "
            "is reached by different URLs. One serve per server: a second one for the same "
            "URL or name is refused at start.",
        ),
    ] = None,
    keep: Annotated[
        int,
        typer.Option(
            "--keep",
            metavar="K",
            min=1,
            help="Verified versions kept loaded per adapter, newest first; at most the "
            "server's --max-loras (vLLM) or --max-loaded-loras (SGLang).",
        ),
    ] = 2,
    drain: Annotated[
        float,
        typer.Option(
            "--drain",
            metavar="SECONDS",
            min=0,
            help="Seconds a version that fell out of the newest K stays loaded before it is "
            "unloaded, so that requests in flight on it finish.",
        ),
    ] = 30.0,
    max_regression: Annotated[
        float,
        typer.Option(
            "--max-regression",
            metavar="FRACTION",
            min=0,
            help="The promotion gate: a version whose held-out eval loss is above the best "
            "live version's by more than this fraction (0.02 = 2%) is refused, never loaded, "
            "and the previous version keeps serving; later versions are judged again. A "
            "version without an eval (no held-out events yet) is promoted as before, and so "
            "is any version while no live version has one.",
        ),
    ] = 0.02,
    max_general_regression: Annotated[
        float | None,
        typer.Option(
            "--max-general-regression",
            metavar="FRACTION",
            min=0,
            help="The general-drift gate: a version whose loss on the trainer's general set "
            "(LORASTREAM_GENERAL_EVAL) is above the base model's by more than this fraction "
            "(0.05 = 5%) is refused and never loaded: it learnt its task at the cost of "
            "everything else. Off by default; a version without a general eval passes.",
        ),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter", metavar="NAME", help="Serve only this adapter (repeatable); default all."
        ),
    ] = None,
    max_lora_rank: Annotated[
        int,
        typer.Option(
            "--max-lora-rank",
            metavar="R",
            help="The server's --max-lora-rank (vLLM accepts 1, 8, 16, 32, 64, 128, 256, "
            "320, 512); versions of a higher rank are refused.",
        ),
    ] = 16,
    served_base: Annotated[
        str | None,
        typer.Option(
            "--served-base",
            metavar="ID",
            help="The server's base model id (as GET /v1/models lists it) when it is not the "
            "directory the trainer announces (a --served-model-name, a hub id, another mount "
            "point): declares that id the same model. Without it, a version is loaded only if "
            "its announced base_model equals the server base's root or id. With it, the "
            "server's id must be this, and versions must name LORASTREAM_BASE_MODEL when set.",
        ),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen",
            metavar="HOST:PORT",
            help="Also run an OpenAI-compatible proxy on HOST:PORT that sends "
            "`model: <adapter>` to the adapter's newest live version; other requests pass "
            "through to --url.",
        ),
    ] = None,
    poll: Annotated[
        float,
        typer.Option(
            "--poll",
            metavar="SECONDS",
            min=0.05,
            help="Seconds between checks that the server still holds the loaded versions "
            "(a restarted server has lost them).",
        ),
    ] = 5.0,
    metrics_port: Annotated[int | None, typer.Option(help=help_for("metrics_port"))] = None,
    metrics_host: Annotated[str | None, typer.Option(help=help_for("metrics_host"))] = None,
    proxy_max_inflight_bytes: Annotated[
        int | None,
        typer.Option(metavar="BYTES", help=help_for("proxy_max_inflight_bytes")),
    ] = None,
    proxy_client_timeout: Annotated[
        float | None,
        typer.Option(metavar="SECONDS", help=help_for("proxy_client_timeout")),
    ] = None,
) -> None:
    """Load every verified adapter version into vLLM or SGLang as <adapter>-v<N>, keep the
    newest K, unload older ones after the drain, reload after a server restart. A version
    whose eval loss regresses past --max-regression (or whose general-set loss drifts
    past --max-general-regression) is refused."""
    from lorastream.cli.common import client_logs_on, settings_of
    from lorastream.cli.stage import serve_metrics, start_stage, stop_on_signals
    from lorastream.serving import Serve, ServeMetrics
    from lorastream.stages import serve_config

    kind = backend.lower()
    if kind not in ("vllm", "sglang"):
        raise typer.BadParameter(f"{backend!r} is not vllm or sglang", param_hint="--backend")
    if max_lora_rank not in MAX_LORA_RANKS:
        raise typer.BadParameter(
            f"{max_lora_rank} is not one of {', '.join(map(str, MAX_LORA_RANKS))}",
            param_hint="--max-lora-rank",
        )
    for one in adapter or []:
        if not re.match(ADAPTER_PATTERN, one):
            raise typer.BadParameter(f"{one!r} is not an adapter name", param_hint="--adapter")
    address = _listen_address(listen) if listen else None
    settings = settings_of(
        ctx,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        proxy_max_inflight_bytes=proxy_max_inflight_bytes,
        proxy_client_timeout=proxy_client_timeout,
    )
    config = serve_config(
        settings,
        backend=kind,
        url=url,
        keep=keep,
        drain=drain,
        adapters=adapter or [],
        max_lora_rank=max_lora_rank,
        served_base=served_base,
        poll=poll,
        max_regression=max_regression,
        name=name,
        max_general_regression=max_general_regression,
    )
    metrics = ServeMetrics()
    # Its metrics port once it knows it is the only serve for this server (below).
    start_stage(settings, metrics.registry, topics=[settings.topics.adapter_updates], metrics=False)

    async def run() -> None:
        loop = Serve(config, metrics)
        stop_on_signals(loop.request_stop)
        client_logs_on()
        await loop.claim()  # before it takes any port: a clash is the one error
        serve_metrics(settings, metrics.registry)
        proxy = None
        if address is not None:
            from lorastream.serving.proxy import Proxy

            proxy = Proxy(
                config.url,
                loop.resolve,
                known=loop.known,
                max_inflight_bytes=settings.proxy_max_inflight_bytes,
                client_timeout=settings.proxy_client_timeout,
            )
            await proxy.start(*address)
        try:
            await loop.run()
        finally:
            if proxy is not None:
                await proxy.stop()

    asyncio.run(run())
