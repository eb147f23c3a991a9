"""``lorastream replay``: the replay job as users run it — checks, progress bar, summary.

The training itself is :class:`trainer.replay.Replay` (the live trainer's
windows, core and committer). This module checks the request before anything
is trained, each problem one :class:`~trainer.exceptions.ReplayError` line
(an unknown adapter, an empty range, offsets the cluster no longer retains
and why, a name already taken), shows a progress bar (events and windows,
rate, time left) and ends with a table of the versions made.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import datetime

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from lorastream.cli.console import print_table
from lorastream.ops.admin import describe_retention, require_topics
from lorastream.settings import Settings
from lorastream.stages import replay_config, replay_decoder
from schemas import ADAPTER_PATTERN
from trainer.core import Outcome, Trained, WindowTrainer
from trainer.exceptions import ReplayError
from trainer.history import Bound, PartitionRange
from trainer.metrics import ReplayMetrics
from trainer.replay import AdapterPlan, Plan, Replay, ReplayReport, Session

__all__ = ["ReplayRequest", "parse_bound", "run_replay"]

_OFFSET = re.compile(r"^[0-9]+$")


def parse_bound(flag: str, text: str | None) -> Bound | None:
    """An offset (digits) or an RFC 3339 time with its offset (``2026-11-27T10:00:00Z``)."""
    if text is None:
        return None
    text = text.strip()
    if _OFFSET.match(text):
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None or "T" not in text.upper():
        raise ReplayError(
            f"{flag} {text!r} is neither an offset nor an RFC 3339 time with its UTC offset "
            "(such as 2026-11-27T10:00:00Z)"
        )
    return moment


@dataclass(frozen=True)
class ReplayRequest:
    """What the user asked for, checked for what can be checked without Kafka."""

    source: str | None
    target: str | None
    start: Bound | None
    end: Bound | None
    rescore: bool
    resume: bool
    dry_run: bool

    @classmethod
    def of(
        cls,
        *,
        source: str | None,
        target: str | None,
        start: str | None,
        end: str | None,
        rescore: bool,
        resume: bool,
        dry_run: bool,
    ) -> ReplayRequest:
        if source is None and not dry_run:
            raise ReplayError("--adapter NAME is required (only --dry-run covers every adapter)")
        if target is None and not dry_run:
            raise ReplayError("--into NEW is required: the name of the lineage to train")
        for flag, name in (("--adapter", source), ("--into", target)):
            if name is not None and not re.match(ADAPTER_PATTERN, name):
                raise ReplayError(f"{flag} {name!r} is not an adapter name ({ADAPTER_PATTERN})")
        if source is not None and source == target:
            raise ReplayError(
                f"--into {target} is the adapter being replayed; a new lineage needs a new name"
            )
        request = cls(
            source,
            target,
            parse_bound("--from", start),
            parse_bound("--to", end),
            rescore,
            resume,
            dry_run,
        )
        if (
            isinstance(request.start, int)
            and isinstance(request.end, int)
            and request.end < request.start
        ):
            raise ReplayError(f"--to {request.end} is before --from {request.start}")
        if (
            isinstance(request.start, datetime)
            and isinstance(request.end, datetime)
            and request.end < request.start
        ):
            raise ReplayError(f"--to {end} is before --from {start}")
        return request

    @property
    def has_range(self) -> bool:
        return self.start is not None or self.end is not None

    def describe_range(self) -> str:
        if not self.has_range:
            return "everything retained"
        start = "the oldest" if self.start is None else _bound(self.start)
        end = "the newest" if self.end is None else _bound(self.end)
        return f"from {start} to {end}"


def _bound(bound: Bound) -> str:
    return f"offset {bound}" if isinstance(bound, int) else bound.isoformat()


def run_replay(
    settings: Settings,
    request: ReplayRequest,
    out: Console,
    err: Console,
    metrics: ReplayMetrics | None = None,
) -> None:
    """Run (or, with ``dry_run``, plan) the replay; raise a LorastreamError on any problem.
    ``metrics`` count the events read, the windows and the versions announced."""
    config = replay_config(
        settings,
        source=request.source,
        target=request.target,
        rescore=request.rescore,
        start=request.start,
        end=request.end,
        resume=request.resume,
    )
    replay = Replay(config, replay_decoder(settings, request.source, request.rescore))
    ranges = asyncio.run(replay.resolve())
    asyncio.run(_check_retention(settings, request, config.topic, ranges, err))
    if request.dry_run:
        plan = asyncio.run(replay.plan())
        _check_found(request, plan, config.topic)
        _print_plan(plan, request, config.topic, settings.window_size, out)
        return
    topics = settings.topics
    asyncio.run(  # where the versions go: a missing one is one line, not a commit that hangs
        require_topics(
            settings.bootstrap_servers,
            [topics.adapter_updates, topics.adapter_latest, topics.quarantine],
            settings.kafka_client_options(),
        )
    )
    report = asyncio.run(_train(settings, request, replay, err, metrics or ReplayMetrics()))
    if report is not None:
        _print_report(report, out)


async def _check_retention(
    settings: Settings,
    request: ReplayRequest,
    topic: str,
    ranges: list[PartitionRange],
    err: Console,
) -> None:
    gone = [r for r in ranges if r.gone is not None]
    if not gone:
        return
    retention = await describe_retention(
        settings.bootstrap_servers, [topic], settings.kafka_client_options()
    )
    why = retention[topic].describe() if topic in retention else "its retention"
    parts = ", ".join(
        f"{r.tp.topic}[{r.tp.partition}] offsets {r.gone[0]}..{r.gone[1]} (the log now starts at {r.log_start})"
        for r in gone
        if r.gone is not None
    )
    if request.start is None:
        err.print(
            f"note: {parts} are no longer retained ({topic} has {why}); the replay starts at "
            "the oldest record kept, so versions trained on the older events are not reproduced",
            markup=False,
            highlight=False,
        )
        return
    first = min(r.log_start for r in gone)
    raise ReplayError(
        f"the range starts before what Kafka retains: {parts} are gone ({topic} has {why}); "
        f"replay from --from {first} or later"
    )


def _check_found(request: ReplayRequest, plan: Plan, topic: str) -> None:
    """An adapter with no events: unknown (nothing at all) or an empty range."""
    if request.source is None:
        if not plan.adapters:
            raise ReplayError(f"no events in {topic} ({request.describe_range()})")
        return
    counts = plan.adapters.get(request.source)
    if counts is not None and counts.seen > 0:
        return
    if request.has_range:
        raise ReplayError(
            f"adapter {request.source} has no events in {topic} {request.describe_range()} "
            "(an empty range)"
        )
    known = ", ".join(sorted(plan.adapters)) or "none"
    raise ReplayError(
        f"unknown adapter {request.source}: {topic} holds no events of it "
        f"(adapters found there: {known})"
    )


async def _train(
    settings: Settings, request: ReplayRequest, replay: Replay, err: Console, metrics: ReplayMetrics
) -> ReplayReport | None:
    config = replay.config
    assert request.source is not None
    async with replay.session() as session:
        existing = session.lineage
        plan = await replay.plan(target=existing)
        _check_found(request, plan, config.topic)
        counts = plan.adapters[request.source]
        if counts.windows == 0:
            done = (
                f"{existing.adapter} is at v{existing.version}"
                if existing.version
                else "no full window"
            )
            err.print(
                f"nothing to train: {done}; {counts.open_events} event(s) of {request.source} "
                f"wait in a partial window of {config.training.window_size}",
                markup=False,
                highlight=False,
            )
            return None
        with err.status(f"loading the base model {config.training.base_model_name}…"):
            core = await asyncio.to_thread(WindowTrainer.load, config.training)
        if existing.version:
            err.print(f"resuming {existing.adapter} at v{existing.version}", highlight=False)
        return await _run_with_progress(replay, core, session, counts, err, metrics)


class _Rate(ProgressColumn):
    """Items per second, e.g. ``41.2/s``."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f}/s", style="progress.data.speed")


async def _run_with_progress(
    replay: Replay,
    core: WindowTrainer,
    session: Session,
    counts: AdapterPlan,
    err: Console,
    metrics: ReplayMetrics,
) -> ReplayReport:
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
        events = progress.add_task("events", total=counts.events)
        windows = progress.add_task("windows", total=counts.windows)

        def on_event() -> None:
            progress.advance(events)
            metrics.events.inc()

        def on_window(outcome: Outcome) -> None:
            progress.advance(windows)
            if isinstance(outcome, Trained):
                metrics.windows.labels("trained").inc()
                metrics.announced.inc()
                metrics.version.labels(outcome.update.adapter).set(outcome.update.version)
            else:
                metrics.windows.labels("quarantined").inc()

        return await replay.run(core, session, on_event=on_event, on_window=on_window)


def _print_plan(plan: Plan, request: ReplayRequest, topic: str, window: int, out: Console) -> None:
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


def _print_report(report: ReplayReport, out: Console) -> None:
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
