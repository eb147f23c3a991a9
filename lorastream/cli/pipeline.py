"""The pipeline's own commands: ``produce`` results, ``score`` them, ``train`` on them.

``score`` and ``train`` are long-lived stages, started the one way of
:mod:`lorastream.cli.stage`; ``produce`` is a job that ends with a count.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from lorastream.cli.common import (
    AdapterDirOption,
    BaseModelOption,
    CompileOption,
    DeviceOption,
    LearningRateOption,
    LoraAlphaOption,
    LoraROption,
    MaxTriesOption,
    MetricsHostOption,
    MetricsPortOption,
    SeedOption,
    StepsPerWindowOption,
    TargetModulesOption,
    WindowSizeOption,
    client_logs_on,
    err,
    out,
    say,
    settings_of,
)
from lorastream.cli.stage import run_faust_worker, start_stage, stop_on_signals
from lorastream.settings import Settings, help_for

__all__ = ["produce", "score", "train"]


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
    metrics = ScoringMetrics()
    topics = config.topics
    # Faust sets up its own logging, and handles the signals itself.
    start_stage(
        settings,
        metrics.registry,
        topics=[topics.generation_results, topics.learning_events, topics.dead_letters],
        logs=False,
    )
    faust_app = create_app(config, metrics)
    err.print(
        f"scoring {config.topics.generation_results} → {config.topics.learning_events} "
        f"on {settings.bootstrap_servers} (group {config.app_id})"
    )
    run_faust_worker(faust_app, settings.bootstrap_servers, loglevel=loglevel, what="score")


def produce(
    ctx: typer.Context,
    file: Annotated[
        str,
        typer.Argument(
            help="JSON Lines: one GenerationResult per line; - reads standard input.",
            metavar="FILE",
        ),
    ],
    strict: Annotated[
        bool, typer.Option("--strict", help="Produce nothing if any line is bad.")
    ] = False,
) -> None:
    """Validate every line of FILE (- for standard input), report the bad ones by number,
    produce the good ones."""
    from lorastream.ops.produce import STDIN_NAME, stdin_copy

    settings = settings_of(ctx)
    if file != "-":
        _produce(settings, Path(file), str(file), strict)
        return
    # A pipe is read once: validating and producing each read a copy of it.
    with stdin_copy(sys.stdin.buffer) as copy:
        _produce(settings, copy, STDIN_NAME, strict)


def _produce(settings: Settings, path: Path, name: str, strict: bool) -> None:
    """``produce`` on ``path``, called ``name`` in every line it reports."""
    from rich.progress import Progress

    from lorastream.ops.produce import produce_file, validate_file

    report = validate_file(path, name)
    for error in report.bad:
        say(err, error.at_line_of(name))
    if report.bad and strict:
        err.print(f"{len(report.bad)} bad line(s); --strict: nothing produced")
        raise typer.Exit(1)
    topic = settings.topics.generation_results
    with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task(f"producing to {topic}", total=report.good)
        sent = asyncio.run(
            produce_file(
                path,
                settings.kafka_connection(),
                topic,
                on_sent=lambda n: progress.advance(task, n),
                name=name,
            )
        )
    out.print(f"produced {sent} to {topic}; {len(report.bad)} bad line(s), {report.blank} blank")
    if report.bad:
        raise typer.Exit(1)


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
    metrics = TrainerMetrics()
    start_stage(
        settings,
        metrics.registry,
        topics=[
            topics.learning_events,
            topics.adapter_updates,
            topics.adapter_latest,
            topics.quarantine,
        ],
    )
    config = trainer_config(settings)

    async def run() -> None:
        trainer = Trainer(config, metrics)
        stop_on_signals(trainer.request_stop)
        async with trainer:
            # Joined: from now on the client's own connection trouble is worth a log line
            # (a failed start is one error line, raised by the trainer itself).
            client_logs_on()
            await trainer.run()

    asyncio.run(run())
