"""``lorastream status``: prints what :func:`lorastream.ops.status.read_status` reads.

``lorastream.cli`` registers the command.
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import nullcontext
from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from lorastream.cli.common import err, out, say, settings_of
from lorastream.cli.console import print_table
from lorastream.ops.status import GroupLag, Status

__all__ = ["status"]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _lag_line(stage: str, lag: GroupLag) -> str:
    parts = ", ".join(f"[{p}] {n}" for p, n in sorted(lag.partitions.items()))
    return f"{stage} lag: {lag.total} on {lag.topic} (group {lag.group}: {parts})"


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment else "-"


def render(status: Status) -> tuple[Table, list[str]]:
    """The adapters' table and the lines under it."""
    table = Table("adapter", "version", "age", "created", "pending", "quarantined")
    for a in status.adapters:
        table.add_row(
            a.adapter,
            str(a.version) if a.version else "-",
            _age(a.age_seconds(status.at)),
            _when(a.created_at),
            _waiting(a.pending, a.window_size),
            str(a.quarantined),
        )
    lines = [
        _lag_line("scorer", status.scorer),
        _lag_line("trainer", status.trainer),
        f"dead letters: {status.dead_letters} in {status.dead_letter_topic}",
    ]
    if any(a.window_size is None for a in status.adapters):
        lines.append(UNKNOWN_WINDOW)
    lines += [hold_line(a.adapter, a.hold) for a in status.adapters if a.hold is not None]
    return table, lines


# What a view says of an adapter with no version: the lineage records its windows, and the
# viewer's own LORASTREAM_WINDOW_SIZE says nothing of the trainer's.
UNKNOWN_WINDOW = "pending n/?: the window size is not known until the adapter's first version"


def _waiting(pending: int, window_size: int | None) -> str:
    """``pending/size``: the events that wait, of the window the lineage shows."""
    return f"{pending}/{'?' if window_size is None else window_size}"


def hold_line(adapter: str, reason: str) -> str:
    """One held adapter, its reason and what mends it."""
    return (
        f"on hold: {adapter}: {reason} (files: `lorastream adapters repair {adapter}`; "
        "a setting: set it back; the trainer checks again every LORASTREAM_HOLD_RECHECK_SECONDS)"
    )


def status(
    ctx: typer.Context,
    json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """Per adapter: the newest version and its age, the events waiting in its open window,
    the windows quarantined; the lag of the scorer's and the trainer's consumer groups;
    the dead letters. Reads Kafka only."""
    from lorastream.ops.admin import require_topics
    from lorastream.ops.status import read_status

    settings = settings_of(ctx)
    topics = settings.topics
    asyncio.run(
        require_topics(
            settings.kafka_connection(),
            [
                topics.generation_results,
                topics.learning_events,
                topics.adapter_updates,
                topics.quarantine,
                topics.dead_letters,
            ],
        )
    )
    with err.status("reading the pipeline's topics…") if err.is_terminal else nullcontext():
        current = asyncio.run(read_status(settings))
    if json:
        import orjson

        sys.stdout.write(orjson.dumps(current.to_json()).decode() + "\n")
        return
    table, lines = render(current)
    if current.adapters:
        print_table(out, table)
    else:
        out.print("no adapter has events or versions yet")
    for line in lines:
        say(out, line)
