"""The ``lorastream`` command line: one script in front of every stage.

Every command reads its configuration through :func:`load_settings`:
flags first, then the environment (the variables in the README), then
defaults. lorastream's own errors print as ``Name: message`` on stderr and
exit 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from lorastream.settings import Settings, help_for, load_settings
from schemas.errors import LorastreamError

if TYPE_CHECKING:
    from trainer.lineage import Lineage

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
broker_app = typer.Typer(
    help="A local single-node Apache Kafka (KRaft) for machines without Docker.",
    no_args_is_help=True,
)
topics_app = typer.Typer(help="The pipeline's Kafka topics.", no_args_is_help=True)
adapters_app = typer.Typer(help="Announced adapter versions.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")
app.add_typer(topics_app, name="topics")
app.add_typer(adapters_app, name="adapters")
# Its commands import out, err and settings_of from here when they run (no import cycle).
from lorastream.cli import inspect as cli_inspect  # noqa: E402
from lorastream.cli import serve as cli_serve  # noqa: E402
from lorastream.cli import status as cli_status  # noqa: E402

app.add_typer(cli_inspect.dead_letters_app, name="dead-letters")
app.add_typer(cli_inspect.quarantine_app, name="quarantine")

# soft_wrap: a line such as a file:line: report or an announcement stays one line when piped.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


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


def settings_of(ctx: typer.Context, **flags: Any) -> Settings:
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


# ── broker ───────────────────────────────────────────────────────────────────


def _local_broker(settings: Settings, port: int | None, secure: bool = False) -> Any:
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


_SECURE_PORT = 9094
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
        out.print(broker.client_exports(), markup=False, highlight=False)


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


# ── topics ───────────────────────────────────────────────────────────────────


@topics_app.command("create")
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
    outcome = asyncio.run(
        create_topics(settings.bootstrap_servers, specs, settings.kafka_client_options())
    )
    for name, what in outcome.items():
        out.print(f"{what:8} {name}")


topics_app.command("list")(cli_inspect.topics_list)
topics_app.command("delete")(cli_inspect.topics_delete)
app.command("serve")(cli_serve.serve)
app.command("status")(cli_status.status)


# ── score ────────────────────────────────────────────────────────────────────


@app.command("score")
def score(
    ctx: typer.Context,
    rouge_threshold: Annotated[
        float | None,
        typer.Option(help=help_for("rouge_threshold")),
    ] = None,
    breakthrough_entropy: Annotated[
        float | None,
        typer.Option(help=help_for("breakthrough_entropy")),
    ] = None,
    qualify_entropy: Annotated[
        float | None,
        typer.Option(help=help_for("qualify_entropy")),
    ] = None,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = None,
    loglevel: Annotated[str, typer.Option(help="Faust's log level.")] = "warning",
) -> None:
    """Run the Faust scoring worker: generation-results → learning-events (+ dead letters)."""
    import faust
    from prometheus_client import start_http_server

    from lorastream.ops.admin import require_topics
    from lorastream.stages import scoring_config
    from streams import create_app
    from streams.metrics import ScoringMetrics

    settings = settings_of(
        ctx,
        rouge_threshold=rouge_threshold,
        breakthrough_entropy=breakthrough_entropy,
        qualify_entropy=qualify_entropy,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
    )
    config = scoring_config(settings)
    # Faust would idle forever on a missing topic and print a traceback for a broker that is
    # down: both are one line here, before the worker starts.
    asyncio.run(
        require_topics(
            settings.bootstrap_servers,
            [
                config.topics.generation_results,
                config.topics.learning_events,
                config.topics.dead_letters,
            ],
            settings.kafka_client_options(),
        )
    )
    metrics = ScoringMetrics()
    if settings.metrics_port:
        start_http_server(
            settings.metrics_port, addr=settings.metrics_host, registry=metrics.registry
        )
    faust_app = create_app(config, metrics)
    err.print(
        f"scoring {config.topics.generation_results} → {config.topics.learning_events} "
        f"on {settings.bootstrap_servers} (group {config.app_id})"
    )
    worker = faust.Worker(faust_app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()


# ── produce ──────────────────────────────────────────────────────────────────


@app.command("produce")
def produce(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            help="JSON Lines: one GenerationResult per line.", exists=True, dir_okay=False
        ),
    ],
    strict: Annotated[
        bool, typer.Option("--strict", help="Produce nothing if any line is bad.")
    ] = False,
) -> None:
    """Validate every line of FILE, report the bad ones by number, produce the good ones."""
    from rich.progress import Progress

    from lorastream.ops.produce import produce_file, validate_file

    settings = settings_of(ctx)
    report = validate_file(file)
    for error in report.bad:
        err.print(
            error.at_line_of(file),
            markup=False,
            highlight=False,
        )
    if report.bad and strict:
        err.print(f"{len(report.bad)} bad line(s); --strict: nothing produced")
        raise typer.Exit(1)
    topic = settings.topics.generation_results
    with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task(f"producing to {topic}", total=report.good)
        sent = asyncio.run(
            produce_file(
                file,
                settings.bootstrap_servers,
                topic,
                settings.kafka_client_options(),
                on_sent=lambda n: progress.advance(task, n),
            )
        )
    out.print(f"produced {sent} to {topic}; {len(report.bad)} bad line(s), {report.blank} blank")
    if report.bad:
        raise typer.Exit(1)


# ── train ────────────────────────────────────────────────────────────────────


@app.command("train")
def train(
    ctx: typer.Context,
    window_size: WindowSizeOption = None,
    base_model: BaseModelOption = None,
    adapter_dir: AdapterDirOption = None,
    max_tries: MaxTriesOption = None,
    max_wait_seconds: Annotated[
        float | None,
        typer.Option(help=help_for("max_wait_seconds")),
    ] = None,
    device: DeviceOption = None,
    seed: SeedOption = None,
    instance_id: Annotated[
        str | None,
        typer.Option(help=help_for("instance_id")),
    ] = None,
    learning_rate: LearningRateOption = None,
    steps_per_window: StepsPerWindowOption = None,
    compile: CompileOption = None,
    lora_r: LoraROption = None,
    lora_alpha: LoraAlphaOption = None,
    target_modules: TargetModulesOption = None,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = None,
) -> None:
    """Run the trainer: learning-events → LoRA steps → adapter-updates, exactly once."""
    import signal

    from prometheus_client import start_http_server

    from lorastream.ops.admin import require_topics
    from lorastream.stages import trainer_config
    from trainer import Trainer, TrainerMetrics
    from trainer.model import check_model_dir

    settings = settings_of(
        ctx,
        window_size=window_size,
        base_model=base_model,
        adapter_dir=adapter_dir,
        max_tries=max_tries,
        max_wait_seconds=max_wait_seconds,
        device=device,
        seed=seed,
        instance_id=instance_id,
        learning_rate=learning_rate,
        steps_per_window=steps_per_window,
        compile=compile,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_target_modules=target_modules,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
    )
    # Before the base model loads (seconds): a base model that is not one, a broker that
    # is down or topics that are missing are one line, at once.
    if settings.base_model is not None:
        check_model_dir(settings.base_model)
    topics = settings.topics
    asyncio.run(
        require_topics(
            settings.bootstrap_servers,
            [
                topics.learning_events,
                topics.adapter_updates,
                topics.adapter_latest,
                topics.quarantine,
            ],
            settings.kafka_client_options(),
        )
    )
    _logging(log_format=settings.log_format)
    metrics = TrainerMetrics()
    if settings.metrics_port:
        start_http_server(
            settings.metrics_port, addr=settings.metrics_host, registry=metrics.registry
        )
    config = trainer_config(settings)

    async def run() -> None:
        trainer = Trainer(config, metrics)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, trainer.request_stop)
        async with trainer:
            # Joined: from now on the client's own connection trouble is worth a log line
            # (a failed start is one error line, raised by the trainer itself).
            _client_logs_on()
            await trainer.run()

    asyncio.run(run())


# ── replay ───────────────────────────────────────────────────────────────────


@app.command("replay")
def replay(
    ctx: typer.Context,
    adapter: Annotated[
        str | None,
        typer.Option(
            "--adapter",
            help="The adapter whose events are replayed (a dry run without it covers every adapter).",
        ),
    ] = None,
    into: Annotated[
        str | None,
        typer.Option("--into", help="The name of the new lineage (versions 1, 2, 3 …)."),
    ] = None,
    from_: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="First offset, or an RFC 3339 time (the first record at or after it); default: the oldest retained.",
        ),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="Last offset, or an RFC 3339 time (the last record at or before it), included; default: the newest.",
        ),
    ] = None,
    rescore: Annotated[
        bool,
        typer.Option(
            "--rescore",
            help="Start from generation-results and score again with the thresholds below.",
        ),
    ] = False,
    rouge_threshold: Annotated[
        float | None,
        typer.Option(help="With --rescore: " + help_for("rouge_threshold")),
    ] = None,
    breakthrough_entropy: Annotated[
        float | None,
        typer.Option(help="With --rescore: " + help_for("breakthrough_entropy")),
    ] = None,
    qualify_entropy: Annotated[
        float | None,
        typer.Option(help="With --rescore: " + help_for("qualify_entropy")),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the lineage --into that a replay made (a killed replay) instead of "
            "refusing; a name the live pipeline owns is always refused.",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the events and windows per adapter; train nothing."),
    ] = False,
    base_model: BaseModelOption = None,
    adapter_dir: AdapterDirOption = None,
    window_size: WindowSizeOption = None,
    max_tries: MaxTriesOption = None,
    device: DeviceOption = None,
    seed: SeedOption = None,
    learning_rate: LearningRateOption = None,
    steps_per_window: StepsPerWindowOption = None,
    compile: CompileOption = None,
    lora_r: LoraROption = None,
    lora_alpha: LoraAlphaOption = None,
    target_modules: TargetModulesOption = None,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = None,
) -> None:
    """Retrain an adapter from the log into a new lineage, exactly as the live trainer would.

    Reads the adapter's learning events (or, with --rescore, its generation
    results scored again), groups them into the live trainer's windows, trains
    and announces versions 1, 2, 3 … of the new lineage, and exits when the
    range is done. Killed, it continues with --resume.
    """
    from lorastream.ops.replay import ReplayRequest, run_replay
    from trainer.metrics import ReplayMetrics

    settings = settings_of(
        ctx,
        rouge_threshold=rouge_threshold,
        breakthrough_entropy=breakthrough_entropy,
        qualify_entropy=qualify_entropy,
        base_model=base_model,
        adapter_dir=adapter_dir,
        window_size=window_size,
        max_tries=max_tries,
        device=device,
        seed=seed,
        learning_rate=learning_rate,
        steps_per_window=steps_per_window,
        compile=compile,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_target_modules=target_modules,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
    )
    _logging(quiet=True, log_format=settings.log_format)
    metrics = ReplayMetrics()
    # Only when asked on the command line: a replay run inside the trainer's container would
    # otherwise take the trainer's LORASTREAM_METRICS_PORT.
    if metrics_port is not None and settings.metrics_port and not dry_run:
        from prometheus_client import start_http_server

        start_http_server(
            settings.metrics_port, addr=settings.metrics_host, registry=metrics.registry
        )
    request = ReplayRequest.of(
        source=adapter,
        target=into,
        start=from_,
        end=to,
        rescore=rescore,
        resume=resume,
        dry_run=dry_run,
    )
    run_replay(settings, request, out, err, metrics)


# ── adapters ─────────────────────────────────────────────────────────────────


def _lineages(settings: Settings) -> dict[str, Lineage]:
    """Every adapter's lineage, read in full from the announcements and the quarantine;
    what LORASTREAM_ANNOUNCE_KEY and LORASTREAM_ADAPTER_DIR do not vouch for is skipped."""
    from lorastream.stages import reader_verifier
    from trainer.history import load_lineages

    return asyncio.run(
        load_lineages(
            settings.bootstrap_servers,
            settings.topics.adapter_updates,
            settings.topics.quarantine,
            settings.kafka_client_options(),
            verifier=reader_verifier(settings),
        )
    )


@adapters_app.command("list")
def adapters_list(
    ctx: typer.Context,
    adapter: Annotated[str | None, typer.Option(help="Only this adapter.")] = None,
    json: Annotated[
        bool, typer.Option("--json", help="One AdapterUpdate JSON document per line.")
    ] = False,
    keep: Annotated[
        int,
        typer.Option(
            "--keep", metavar="K", min=1, help="As serve's --keep, for the promotion gate's marks."
        ),
    ] = 2,
    max_regression: Annotated[
        float,
        typer.Option(
            "--max-regression",
            metavar="FRACTION",
            min=0,
            help="As serve's --max-regression: versions the promotion gate refuses are marked.",
        ),
    ] = 0.02,
) -> None:
    """Print the lineage of every adapter: version, window, train loss, eval loss on the
    held-out events (beside the base model's), time; and the events that wait in an open
    window (a partial window trains when full, or after LORASTREAM_MAX_WAIT_SECONDS).

    A version that `lorastream serve` with the same --keep and --max-regression refuses
    for its eval loss is marked REFUSED, and why is said below the table."""
    from rich.table import Table

    from lorastream.cli.console import print_table
    from lorastream.serving.verify import Refusal, judge_versions
    from schemas import encode
    from trainer.history import pending_events
    from trainer.lineage import Lineage

    settings = settings_of(ctx)
    lineages = _lineages(settings)
    chosen = [lineages[a] for a in sorted(lineages) if adapter in (None, a)]
    if json:
        for lineage in chosen:
            for update in lineage.updates:
                sys.stdout.write(encode(update).decode() + "\n")
        return
    pending = asyncio.run(
        pending_events(
            settings.bootstrap_servers,
            settings.topics.learning_events,
            settings.trainer_group_id,
            lineages,
            settings.kafka_client_options(),
            settings.eval_fraction,
        )
    )
    for name in sorted(pending.keys() - lineages.keys()):
        if adapter in (None, name):
            chosen.append(Lineage(name))
    table = Table(
        "adapter", "version", "parent", "window", "events", "loss", "eval", "created", "sha256"
    )
    refusals: list[tuple[str, int, Refusal]] = []
    for lineage in chosen:
        verdicts: dict[int, Refusal | None] = {}
        judge_versions({u.version: u for u in lineage.updates}, verdicts, keep, max_regression)
        for u in lineage.updates:
            w = u.window
            verdict = verdicts[u.version]
            if verdict is not None:
                refusals.append((u.adapter, u.version, verdict))
            table.add_row(
                u.adapter,
                str(u.version),
                str(u.parent_version or "-"),
                str(w),
                str(w.size),
                f"{u.train_loss:.4f}",
                (f"{u.eval.loss:.2f} (base {u.eval.base_loss:.2f})" if u.eval else "-")
                + (" REFUSED" if verdict else ""),
                u.created_at.isoformat(timespec="seconds"),
                u.sha256[:12],
            )
        if pending.get(lineage.adapter):
            table.add_row(
                lineage.adapter,
                "-",
                "-",
                f"open window: {pending[lineage.adapter]} event(s) waiting for "
                f"{settings.window_size}",
                "",
                "",
                "",
                "",
                "",
            )
        if lineage.quarantined:
            table.add_row(
                lineage.adapter,
                "-",
                "-",
                f"{lineage.quarantined} window(s) quarantined",
                "",
                "",
                "",
                "",
                "",
            )
    print_table(out, table)
    for name, version, refusal in refusals:
        out.print(
            f"{name} v{version}: REFUSED by the promotion gate (serve --keep {keep} "
            f"--max-regression {max_regression:g}): {refusal.detail}",
            highlight=False,
            soft_wrap=True,
        )
    from lorastream.cli.status import hold_line
    from lorastream.ops.status import holds_of

    newest = [lin.latest for lin in chosen if lin.latest is not None]
    for name, reason in sorted(holds_of(settings, newest).items()):
        out.print(hold_line(name, reason), highlight=False, soft_wrap=True)


@adapters_app.command("repair")
def adapters_repair(
    ctx: typer.Context,
    adapter: Annotated[str, typer.Argument(help="The adapter whose files to repair.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only check and say what is wrong.")
    ] = False,
) -> None:
    """Check every announced version of ADAPTER against its announcement, and rebuild the
    bad ones from the log: the lineage is trained again from the base model with the
    trainer's own rule, each version checked bit for bit against what was announced, and
    only then put in place of the bad one (set aside as .v<N>.corrupt-<id>). Versions on
    disk that were never announced are set aside (.v<N>.unannounced-<id>). A trainer that
    holds the adapter goes on by itself (it checks every LORASTREAM_HOLD_RECHECK_SECONDS,
    default 30). Run it with the settings the lineage
    was trained with (seed, learning rate, evaluation); nothing changes unless every
    rebuilt version matches."""
    from lorastream.stages import replay_config
    from trainer.repair import repair

    settings = settings_of(ctx)
    config = replay_config(settings, source=adapter, target=adapter)
    report = asyncio.run(repair(config, adapter, dry_run=dry_run))
    for fault in report.faults:
        out.print(f"{adapter} v{fault.version}: {fault.reason}", highlight=False, soft_wrap=True)
    for path in report.set_aside:
        what = "would set aside" if dry_run else "set aside"
        out.print(f"{what} {path} (never announced)", highlight=False, soft_wrap=True)
    if not report.faults:
        out.print(f"{adapter}: all {report.versions} version(s) are as announced")
    elif dry_run:
        out.print(f"{adapter}: {len(report.faults)} version(s) to rebuild (without --dry-run)")
    else:
        restored = ", ".join(f"v{v}" for v in report.restored)
        out.print(
            f"{adapter}: restored {restored} as announced ({report.retrained} window(s) "
            "trained again from the log)"
        )


@adapters_app.command("fetch")
def adapters_fetch(
    ctx: typer.Context,
    adapter: Annotated[str, typer.Argument(help="The adapter.")],
    version: Annotated[
        int | None, typer.Option("--version", min=1, help="This version; default the newest.")
    ] = None,
) -> None:
    """Print the local directory of an adapter version, ready for
    ``PeftModel.from_pretrained(base, DIR)`` or a server's load call.

    A version on an object store (s3://…) is fetched into LORASTREAM_ADAPTER_CACHE first
    and every file checked against its manifest; a local one is checked against the
    announced sha256. A version whose upload never finished (no manifest) is an error."""
    from lorastream.serving.verify import check_files
    from trainer.objects import fetch_version, is_remote

    settings = settings_of(ctx)
    lineages = _lineages(settings)
    lineage = lineages.get(adapter)
    if lineage is None or not lineage.updates:
        err.print(
            f"no version of adapter {adapter!r} is announced on {settings.topics.adapter_updates}"
        )
        raise typer.Exit(1)
    chosen = [u for u in lineage.updates if version in (None, u.version)]
    if not chosen:
        newest = lineage.updates[-1].version
        err.print(f"adapter {adapter} has no version {version} (the newest is v{newest})")
        raise typer.Exit(1)
    update = chosen[-1]
    local = update.uri
    if is_remote(update.uri):
        local = str(fetch_version(update.uri, settings.adapter_cache_dir))
    refusal = check_files(update.model_copy(update={"uri": local}), max_rank=1 << 30)
    if refusal is not None:
        err.print(f"{adapter} v{update.version}: {refusal.detail}")
        raise typer.Exit(1)
    out.print(local, highlight=False)


@adapters_app.command("follow")
def adapters_follow(
    ctx: typer.Context,
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Print the announcements made so far first.")
    ] = False,
    count: Annotated[
        int | None, typer.Option("--count", "-n", help="Exit after this many announcements.")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(help="Exit (status 1) if the count is not reached within this many seconds."),
    ] = None,
    json: Annotated[
        bool, typer.Option("--json", help="Print each AdapterUpdate as one JSON line.")
    ] = False,
    give_up_after: Annotated[
        float,
        typer.Option(
            min=1, help="Exit (status 1) when Kafka has not answered for this many seconds."
        ),
    ] = 60.0,
) -> None:
    """Print each AdapterUpdate as it is committed (read_committed).

    Starts at the end of the topic unless --from-beginning; says so on stderr.
    """
    from lorastream.ops.follow import follow
    from lorastream.stages import reader_verifier

    settings = settings_of(ctx)

    def show(update: Any, raw: bytes) -> None:
        if json:
            sys.stdout.write(raw.decode() + "\n")
            sys.stdout.flush()
        else:
            w = update.window
            out.print(
                f"{update.adapter} v{update.version}  loss {update.train_loss:.4f}  "
                f"{w} ({w.size} events)  "
                f"sha256 {update.sha256[:12]}  {update.uri}",
                highlight=False,
            )

    seen = asyncio.run(
        follow(
            settings.bootstrap_servers,
            settings.topics.adapter_updates,
            show,
            from_beginning=from_beginning,
            count=count,
            timeout=timeout,
            client_options=settings.kafka_client_options(),
            on_status=lambda line: err.print(line, markup=False, highlight=False),
            give_up_after=give_up_after,
            verifier=reader_verifier(settings),
        )
    )
    if count is not None and seen < count:
        err.print(f"only {seen} of {count} announcements within {timeout}s")
        raise typer.Exit(1)


@app.command("demo")
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


def _logging(quiet: bool = False, log_format: str = "text") -> None:
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


def _client_logs_on() -> None:
    """aiokafka's warnings and errors, each kind at most every 30 s, for a running stage."""
    client = logging.getLogger("aiokafka")
    client.setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Repeats) for f in handler.filters):
            handler.addFilter(_Repeats())


def main() -> None:
    # aiokafka logs every failed connection at ERROR before raising; the command reports
    # the failure itself, once (a stage that runs for long turns these logs back on).
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        app()
    except LorastreamError as exc:
        err.print(f"{type(exc).__name__}: {exc}", markup=False, highlight=False)
        sys.exit(1)
