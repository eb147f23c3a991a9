"""``lorastream replay``: the replay job as users run it — checks, progress bar, summary.

The job is :mod:`lorastream.ops.replay`; this module renders what it returns
(the dry run's plan, the run's report) and shows its progress on stderr.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

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
    err,
    out,
    say,
    settings_of,
)
from lorastream.cli.console import print_table
from lorastream.cli.stage import start_stage
from lorastream.settings import help_for

if TYPE_CHECKING:
    from lorastream.ops.replay import Forgotten, NothingToTrain, ReplayRequest, ReplayTicks
    from lorastream.settings import Settings
    from trainer.replay import Plan, ReplayReport

__all__ = ["replay"]


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
    from lorastream.ops.replay import ReplayRequest

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
    request = ReplayRequest.of(
        source=adapter,
        target=into,
        start=from_,
        end=to,
        rescore=rescore,
        resume=resume,
        dry_run=dry_run,
    )
    try:
        # Metrics only when asked on the command line: a replay run inside the trainer's
        # container would otherwise take the trainer's LORASTREAM_METRICS_PORT.
        _run(settings, request, metrics_port is not None and not dry_run)
    except KeyboardInterrupt:  # Ctrl-C: what is committed stays, and a --resume goes on
        say(err, _interrupted_line(dry_run))
        raise typer.Exit(130) from None


def _interrupted_line(dry_run: bool) -> str:
    """What a replay stopped by SIGINT says: how to go on, as a command to paste."""
    if dry_run:
        return "replay: stopped (SIGINT) during the dry run; nothing was trained"
    args = sys.argv[1:]
    again = shlex.join(["lorastream", *args, *([] if "--resume" in args else ["--resume"])])
    return (
        "replay: stopped (SIGINT); the versions announced so far stay, "
        f"continue with --resume: {again}"
    )


def _run(settings: Settings, request: ReplayRequest, metrics_wanted: bool) -> None:
    """The replay itself: check, then plan (a dry run) or train, and print what it did."""
    from lorastream.ops.replay import NothingToTrain, plan_replay, prepare_replay, train_replay
    from trainer.metrics import ReplayMetrics

    metrics = ReplayMetrics()
    start_stage(settings, metrics.registry, quiet=True, metrics=metrics_wanted)
    prepared = prepare_replay(settings, request)
    if prepared.forgotten is not None:
        say(err, _forgotten_note(prepared.forgotten))
    if request.dry_run:
        plan = plan_replay(prepared)
        _print_plan(plan, request, prepared.topic, settings.window_size)
        return
    outcome = train_replay(prepared, _Watcher(), metrics)
    if isinstance(outcome, NothingToTrain):
        say(err, _nothing_line(outcome))
    else:
        _print_report(outcome)


def _forgotten_note(forgotten: Forgotten) -> str:
    return (
        f"note: {forgotten.describe()} are no longer retained ({forgotten.topic} has "
        f"{forgotten.why}); the replay starts at the oldest record kept, so versions trained "
        "on the older events are not reproduced"
    )


def _nothing_line(nothing: NothingToTrain) -> str:
    done = f"{nothing.target} is at v{nothing.version}" if nothing.version else "no full window"
    return (
        f"nothing to train: {done}; {nothing.open_events} event(s) of {nothing.source} "
        f"wait in a partial window of {nothing.window_size}"
    )


class _Rate(ProgressColumn):
    """Items per second, e.g. ``41.2/s``."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f}/s", style="progress.data.speed")


class _Ticks:
    """Advances the two bars of :meth:`_Watcher.training`."""

    def __init__(self, progress: Progress, events: TaskID, windows: TaskID) -> None:
        self._progress, self._events, self._windows = progress, events, windows

    def event(self) -> None:
        self._progress.advance(self._events)

    def window(self) -> None:
        self._progress.advance(self._windows)


class _Watcher:
    """The replay's progress on stderr: a spinner while the base model loads, then a bar
    for the events and one for the windows (rate, time left)."""

    def loading(self, base_model: str) -> AbstractContextManager[object]:
        return err.status(f"loading the base model {base_model}…")

    def resuming(self, adapter: str, version: int) -> None:
        err.print(f"resuming {adapter} at v{version}", highlight=False)

    @contextmanager
    def training(self, events: int, windows: int) -> Iterator[ReplayTicks]:
        progress = Progress(
            TextColumn("{task.description:>8}"),
            BarColumn(),
            MofNCompleteColumn(),
            _Rate(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=False,
        )
        with progress:
            events_task = progress.add_task("events", total=events)
            windows_task = progress.add_task("windows", total=windows)
            yield _Ticks(progress, events_task, windows_task)


def _print_plan(plan: Plan, request: ReplayRequest, topic: str, window: int) -> None:
    table = Table(
        "adapter",
        "events",
        "windows",
        "left open",
        "held out",
        "skipped",
        title=f"replay of {topic} ({request.describe_range()}), windows of {window}",
    )
    for name in sorted(plan.adapters):
        counts = plan.adapters[name]
        table.add_row(
            name,
            str(counts.events),
            str(counts.windows),
            str(counts.open_events),
            str(counts.held_out),
            str(counts.skipped),
        )
    print_table(out, table)
    out.print(
        f"{plan.records} records read, {plan.unreadable} unreadable; dry run: nothing trained",
        highlight=False,
    )


def _print_report(report: ReplayReport) -> None:
    table = Table(
        "version", "window", "events", "loss", "step s", title=f"{report.source} → {report.target}"
    )
    for trained in report.trained:
        u = trained.update
        w = u.window
        table.add_row(
            f"v{u.version}",
            str(w),
            str(w.size),
            f"{u.train_loss:.4f}",
            f"{trained.step_seconds:.3f}",
        )
    for entry in report.quarantined:
        spec = entry.window
        where = str(spec) if spec else "-"
        table.add_row("quarantined", where, str(len(entry.events)), "-", "-")
    print_table(out, table)
    windows = len(report.trained) + len(report.quarantined)
    seconds = max(report.seconds, 1e-9)
    versions = (
        f"v{report.trained[0].update.version}–v{report.trained[-1].update.version}"
        if report.trained
        else "no version"
    )
    out.print(
        f"{report.target}: {versions} from {report.trained_events} events of {report.source} in "
        f"{report.seconds:.1f}s ({report.events / seconds:.1f} events/s, "
        f"{windows / seconds:.2f} windows/s); {len(report.quarantined)} window(s) quarantined; "
        f"{report.open_events} event(s) left in a partial window",
        highlight=False,
    )
