"""The commands that show what the pipeline refused, and the topics' list and delete.

``lorastream dead-letters list|export``, ``lorastream quarantine list|retry`` and
``lorastream topics list|delete``. The reading is in :mod:`lorastream.ops.inspect`
and :mod:`lorastream.ops.admin`; these functions only print. ``lorastream.cli``
registers them.
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lorastream.cli.common import err, out, say, settings_of

if TYPE_CHECKING:
    from rich.console import Console

    from lorastream.ops.inspect import DeadLetterEntry, QuarantineEntry

__all__ = ["dead_letters_app", "quarantine_app", "topics_delete", "topics_list"]

dead_letters_app = typer.Typer(
    help="Records the scorer refused, from the dead-letter topic.", no_args_is_help=True
)
quarantine_app = typer.Typer(
    help="Windows the trainer could not train, from the quarantine topic.", no_args_is_help=True
)

_PREVIEW_CHARS = 120

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]


def _json_line(document: dict[str, Any]) -> None:
    import orjson

    sys.stdout.write(orjson.dumps(document).decode() + "\n")
    sys.stdout.flush()


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _bytes_shown(raw: bytes | None) -> str:
    """A short, one-line rendering of a key or value, with its size when cut."""
    if raw is None:
        return "-"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        shown = repr(raw[: _PREVIEW_CHARS // 2])
        return (
            f"{shown}{'…' if len(raw) > _PREVIEW_CHARS // 2 else ''} ({len(raw)} bytes, not UTF-8)"
        )
    if len(text) <= _PREVIEW_CHARS:
        return _printable(text)
    return f"{_printable(text[:_PREVIEW_CHARS])}… ({len(raw)} bytes)"


# ── dead letters ─────────────────────────────────────────────────────────────


def _show_dead_letter(out: Console, entry: DeadLetterEntry) -> None:
    head = str(entry.position)
    if entry.source is not None:
        head += f"  from {entry.source}"
    head += f"  key {_bytes_shown(entry.key)}"
    if entry.truncated and entry.headers is not None:
        cut = [
            f"{part} cut from {size} bytes"
            for part, size in (("key", entry.headers.key_size), ("value", entry.headers.value_size))
            if size is not None
        ]
        head += f"  truncated ({', '.join(cut)})"
    say(out, head)
    if entry.unreadable is not None:
        say(out, f"  headers unreadable: {entry.unreadable}")
    else:
        say(out, f"  reason  {entry.reason}")
        say(out, f"  fields  {', '.join(entry.fields) or '-'}")
    say(out, f"  value   {_bytes_shown(entry.value)}")


@dead_letters_app.command("list")
def dead_letters_list(
    ctx: typer.Context,
    json: JsonOption = False,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Show at most N, the oldest first.")
    ] = None,
) -> None:
    """Every dead letter, oldest first: its position, the reason, the fields named, where
    the refused record was read, its key and the start of its value; then exit.

    --json writes one object per line: position, reason, error_type, fields, source,
    headers_unreadable, key and value (text when UTF-8, else base64, as *_encoding
    says), value_bytes, truncated and original (the sizes and sha256 of what was cut).
    """
    from lorastream.ops.inspect import read_dead_letters

    settings = settings_of(ctx)
    topic = settings.topics.dead_letters

    async def run() -> tuple[int, bool]:
        shown = 0
        wanted = None if limit is None else limit + 1  # one more says whether more remain
        letters = read_dead_letters(settings.kafka_connection(), topic, wanted)
        async with aclosing(letters):
            async for entry in letters:
                if limit is not None and shown == limit:
                    return shown, True
                if json:
                    _json_line(entry.to_json())
                else:
                    _show_dead_letter(out, entry)
                shown += 1
        return shown, False

    shown, more = asyncio.run(run())
    if more:
        first = "the first dead letter" if shown == 1 else f"the first {shown} dead letters"
        say(err, f"{first} of {topic}; more remain (raise --limit)")
    else:
        say(err, f"{shown or 'no'} dead letter{'' if shown == 1 else 's'} in {topic}")


@dead_letters_app.command("export")
def dead_letters_export(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The JSON Lines file to write.", dir_okay=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace FILE if it exists.")] = False,
) -> None:
    """Write the original value of each dead letter as one line of FILE, to fix and send
    back with `lorastream produce FILE`.

    A dead letter whose value is not UTF-8, spans several lines, was cut or is missing
    is skipped and named with its position.
    """
    from lorastream.ops.inspect import export_dead_letters

    settings = settings_of(ctx)
    topic = settings.topics.dead_letters
    report = asyncio.run(
        export_dead_letters(settings.kafka_connection(), topic, file, overwrite=force)
    )
    for number, entry in enumerate(report.lines, start=1):
        say(out, f"{file}:{number}: from {entry.position}: {entry.reason or 'no reason'}")
    if report.skipped:
        say(err, f"skipped {len(report.skipped)} that cannot be a line of {file}:")
        for entry, why in report.skipped:
            say(err, f"  {entry.position}: {why}")
    if not report.lines:
        say(out, f"nothing to fix in {topic}: no dead letter could be written; {file} not written")
        return
    say(out, f"wrote {len(report.lines)} dead letter(s) to {file}, one per line, as refused")
    say(
        out,
        f"next: fix each line (its problem is above), then run `lorastream produce {file}`: "
        f"it checks every line, names the ones still bad by number and produces the good "
        f"ones to {settings.topics.generation_results} (--strict: nothing while any is bad)",
    )


# ── quarantine ───────────────────────────────────────────────────────────────


def _show_quarantined(out: Console, entry: QuarantineEntry) -> None:
    record = entry.record
    if record is None:
        say(out, f"{entry.position}  not a quarantine record: {entry.unreadable}")
        return
    if record.window is not None:
        w = record.window
        what = f"window {w}  {w.size} events"
        if record.truncated:
            what += (
                f" (truncated: left out of the record, which would have been "
                f"{record.original_size} bytes; they lie at the window's offsets)"
            )
    else:
        s = record.source
        where = f"{s.topic}[{s.partition}]@{s.offset}" if s is not None else "?"
        what = f"unreadable event {where}"
        if record.truncated:
            what += f" (value cut, {record.original_size} bytes originally)"
    say(out, f"{entry.position}  adapter {record.adapter or '-'}  {what}  tries {record.tries}")
    say(out, f"  error  {record.error}")


@quarantine_app.command("list")
def quarantine_list(ctx: typer.Context, json: JsonOption = False) -> None:
    """Every quarantine record: its position, the adapter, the window's source positions
    (first..last offset) and events, the tries, the error, and whether it was truncated.

    --json writes one object per line: position, kind (window, event: one unreadable
    learning event, or unreadable: not a quarantine record), adapter, window, source,
    events, tries, error, truncated, original_size, original_sha256, value_bytes,
    created_at and unreadable.
    """
    from lorastream.ops.inspect import read_quarantine

    settings = settings_of(ctx)
    topic = settings.topics.quarantine

    async def run() -> int:
        count = 0
        records = read_quarantine(settings.kafka_connection(), topic)
        async with aclosing(records):  # as dead-letters list: closed on a closed stdout too
            async for entry in records:
                if json:
                    _json_line(entry.to_json())
                else:
                    _show_quarantined(out, entry)
                count += 1
        return count

    count = asyncio.run(run())
    say(err, f"{count or 'no'} quarantine record{'' if count == 1 else 's'} in {topic}")


@quarantine_app.command("retry")
def quarantine_retry(
    ctx: typer.Context,
    partition: Annotated[
        int | None,
        typer.Option("--partition", min=0, help="The quarantine record's partition."),
    ] = None,
    offset: Annotated[
        int | None, typer.Option("--offset", min=0, help="The quarantine record's offset.")
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option("--adapter", help="Retry every quarantined window of this adapter."),
    ] = None,
) -> None:
    """Re-publish a quarantined window's learning events, keyed by adapter, so that the
    trainer trains them again (as new events: they get new offsets).

    Refused, with the reason: a truncated record (its events were left out), an
    unreadable event quarantined alone (no events), events already trained, a retry
    that was itself quarantined (retry that record). A retry not yet trained is not
    detected; repeating it is harmless, as the trainer skips an id it holds or trained.
    """
    from lorastream.ops.inspect import InspectError
    from lorastream.ops.retry import retry_quarantined
    from lorastream.stages import reader_verifier
    from trainer.lineage import check_adapter_name

    if adapter is not None and (partition is not None or offset is not None):
        raise InspectError(
            "--adapter retries all of an adapter's windows; leave out --partition and --offset"
        )
    if adapter is None and (partition is None or offset is None):
        raise InspectError(
            "name the quarantine record with --partition and --offset "
            "(`lorastream quarantine list` shows them), or use --adapter"
        )
    if adapter is not None:
        check_adapter_name("--adapter", adapter)
    settings = settings_of(ctx)
    position = None if partition is None or offset is None else (partition, offset)
    report = asyncio.run(
        retry_quarantined(
            settings.kafka_connection(),
            settings.topics,
            settings.topic_prefix,
            position=position,
            adapter=adapter,
            verifier=reader_verifier(settings),
        )
    )
    for why in report.refused:
        say(err, f"skipped: {why}")
    for done in report.republished:
        ids = done.event_ids
        span = ids[0] if len(ids) == 1 else f"{ids[0]} … {ids[-1]}"
        note = (
            f"; {done.already_trained} of them trained already (the trainer skips those)"
            if done.already_trained
            else ""
        )
        say(
            out,
            f"re-published {done.quarantined}: {len(ids)} events of {done.adapter} "
            f"({span}) to {done.where}{note}",
        )
    adapters = sorted({done.adapter for done in report.republished})
    say(
        out,
        f"the trainer trains them as new events of {', '.join(adapters)}; "
        "`lorastream adapters follow` shows the version it announces",
    )


# ── topics (registered on `lorastream topics`) ───────────────────────────────


def _retained(records: int | None) -> str:
    return "?" if records is None else str(records)


def _topic_table(out: Console, rows: list[tuple[str, str, str]]) -> None:
    width = max([len("topic"), *(len(name) for name, _, _ in rows)])
    say(out, f"{'topic':<{width}}  {'partitions':>10}  {'retained':>10}")
    for name, partitions, retained in rows:
        say(out, f"{name:<{width}}  {partitions:>10}  {retained:>10}")


def topics_list(
    ctx: typer.Context,
    all_: Annotated[
        bool,
        typer.Option("--all", help="Every topic of the cluster but Kafka's internal ones."),
    ] = False,
) -> None:
    """The pipeline's topics (with the prefix): partitions, and the offsets each retains.

    "retained" counts the offsets a topic holds now: its records, plus one commit
    marker per transaction on the topics written in transactions.
    """
    from lorastream.ops.admin import list_topics

    settings = settings_of(ctx)
    found = asyncio.run(
        list_topics(settings.kafka_connection(), "" if all_ else settings.topic_prefix)
    )
    by_name = {info.name: info for info in found}
    names = sorted(by_name) if all_ else settings.topics.all()
    rows = []
    for name in names:
        info = by_name.get(name)
        if info is None:
            rows.append((name, "missing", "-"))
        else:
            rows.append((name, str(info.partitions), _retained(info.records)))
    _topic_table(out, rows)
    if not all_ and len(by_name.keys() & set(names)) < len(names):
        say(out, "(run `lorastream topics create` for the missing ones)")


def topics_delete(
    ctx: typer.Context,
    prefix: Annotated[
        str,
        typer.Option("--prefix", help="Delete every topic whose name starts with this."),
    ],
    yes: Annotated[
        bool, typer.Option("--yes", help="Delete them; without it, only list them.")
    ] = False,
) -> None:
    """List the topics whose name starts with PREFIX; with --yes, delete them.

    Without --yes it exits 1 having deleted nothing. An empty prefix is refused.
    """
    from lorastream.ops.admin import delete_topics, list_topics
    from lorastream.ops.inspect import InspectError

    if not prefix:
        raise InspectError(
            "--prefix is empty, which would delete every topic of the cluster; "
            "give the prefix of the topics to delete"
        )
    settings = settings_of(ctx)
    kafka = settings.kafka_connection()
    found = asyncio.run(list_topics(kafka, prefix))
    if not found:
        say(out, f"no topic on {kafka.servers} starts with {prefix!r}; nothing to delete")
        return
    _topic_table(out, [(t.name, str(t.partitions), _retained(t.records)) for t in found])
    if not yes:
        say(err, f"{len(found)} topic(s) would be deleted; add --yes to delete them")
        raise typer.Exit(1)
    deleted = asyncio.run(delete_topics(kafka, [t.name for t in found]))
    say(out, f"deleted {len(deleted)} topic(s) starting with {prefix!r}")
