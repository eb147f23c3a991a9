"""``lorastream adapters list|forgetting|repair|fetch|follow``: the announced adapter
versions, as a table, as a forgetting matrix, as files on disk, or as they are announced.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lorastream.cli.common import err, out, say, settings_of

if TYPE_CHECKING:
    from lorastream.settings import Settings
    from trainer.lineage import Lineage

__all__ = ["adapters_app"]

adapters_app = typer.Typer(help="Announced adapter versions.", no_args_is_help=True)


def _lineages(settings: Settings) -> dict[str, Lineage]:
    """Every adapter's lineage, read in full from the announcements and the quarantine;
    what LORASTREAM_ANNOUNCE_KEY and LORASTREAM_ADAPTER_DIR do not vouch for is skipped."""
    from lorastream.stages import reader_verifier
    from trainer.history import load_lineages

    return asyncio.run(
        load_lineages(
            settings.kafka_connection(),
            settings.topics.adapter_updates,
            settings.topics.quarantine,
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
    for its eval loss is marked REFUSED, and why is said below the table.

    The window an open one waits to fill is the lineage's (its newest windows), not this
    shell's LORASTREAM_WINDOW_SIZE; the trainer's lag is counted as `status` counts it."""
    from rich.table import Table

    from lorastream.cli.console import print_table
    from lorastream.cli.status import UNKNOWN_WINDOW, hold_line
    from lorastream.ops.status import group_lag, holds_of
    from lorastream.serving.verify import Refusal, judge_versions
    from schemas import encode
    from trainer.lineage import Lineage, check_adapter_name
    from trainer.ranges import pending_events

    if adapter is not None:
        check_adapter_name("--adapter", adapter)
    settings = settings_of(ctx)
    lineages = _lineages(settings)
    # The open windows are read for the table, and for a name no lineage has (it may have
    # events and no version yet); --json of known lineages needs neither.
    needed = not json or (adapter is not None and adapter not in lineages)
    pending = (
        asyncio.run(
            pending_events(
                settings.kafka_connection(),
                settings.topics.learning_events,
                settings.trainer_group_id,
                lineages,
                settings.eval_fraction,
            )
        )
        if needed
        else {}
    )
    if adapter is not None and adapter not in lineages and adapter not in pending:
        raise _unknown(settings, "--adapter", adapter, lineages.keys() | pending.keys())
    chosen = [lineages[a] for a in sorted(lineages) if adapter in (None, a)]
    if json:
        for lineage in chosen:
            for update in lineage.updates:
                sys.stdout.write(encode(update).decode() + "\n")
        return
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
                _open_window(pending[lineage.adapter], lineage.window_size),
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
    newest = [lin.latest for lin in chosen if lin.latest is not None]
    for name, reason in sorted(holds_of(settings, newest).items()):
        out.print(hold_line(name, reason), highlight=False, soft_wrap=True)
    if any(pending.get(lin.adapter) and lin.window_size is None for lin in chosen):
        out.print(UNKNOWN_WINDOW, highlight=False, soft_wrap=True)
    lag = asyncio.run(
        group_lag(
            settings.kafka_connection(), settings.trainer_group_id, settings.topics.learning_events
        )
    )
    out.print(
        f"trainer lag: {lag.total} on {lag.topic} (group {lag.group}), as `status` counts it",
        highlight=False,
        soft_wrap=True,
    )


@adapters_app.command("forgetting")
def adapters_forgetting(
    ctx: typer.Context,
    adapter: Annotated[str, typer.Argument(help="The adapter.")],
    json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """Print ADAPTER's forgetting matrix from its announcements: R[i][j] is the held-out
    loss on segment j of the last version that trained in segment i (a segment is a
    producer's metadata.segment label, else LORASTREAM_EVAL_SEGMENT_WINDOWS versions).
    ACC is the mean of the last row; BWT the mean over earlier segments j of
    R[j][j] - R[T][j]: negative means forgetting (the loss on earlier segments rose)."""
    import orjson

    from trainer.forgetting import forgetting
    from trainer.lineage import check_adapter_name

    check_adapter_name("ADAPTER", adapter)
    settings = settings_of(ctx)
    lineages = _lineages(settings)
    if adapter not in lineages or not lineages[adapter].updates:
        raise _announced_only(settings, adapter, lineages)
    matrix = forgetting(adapter, lineages[adapter].updates)
    if json:
        sys.stdout.write(orjson.dumps(matrix.to_json()).decode() + "\n")
        return
    if not matrix.segments:
        out.print(f"{adapter}: no version has a per-segment evaluation yet", highlight=False)
        return
    for line in matrix.lines():
        out.print(line, highlight=False, soft_wrap=True)


def _open_window(waiting: int, window_size: int | None) -> str:
    """The open window's row: its events, and the window they wait to fill (the lineage's)."""
    if window_size is None:
        return f"open window: {waiting} event(s) waiting (window size not known until v1)"
    return f"open window: {waiting} event(s) waiting for {window_size}"


def _unknown(settings: Settings, flag: str, name: str, known: Iterable[str]) -> Exception:
    """The one-line error for a valid ``name`` that no adapter has: those that exist."""
    from trainer.lineage import unknown_adapter

    topics = settings.topics
    return unknown_adapter(
        flag, name, known, f"{topics.adapter_updates} or {topics.learning_events}"
    )


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
    from trainer.lineage import check_adapter_name
    from trainer.repair import repair

    check_adapter_name("ADAPTER", adapter)
    settings = settings_of(ctx)
    lineages = _lineages(settings)
    if adapter not in lineages or not lineages[adapter].updates:
        raise _announced_only(settings, adapter, lineages)
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
    from trainer.lineage import check_adapter_name
    from trainer.objects import fetch_version, is_remote

    check_adapter_name("ADAPTER", adapter)
    settings = settings_of(ctx)
    lineages = _lineages(settings)
    lineage = lineages.get(adapter)
    if lineage is None or not lineage.updates:
        raise _announced_only(settings, adapter, lineages)
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


def _announced_only(settings: Settings, name: str, lineages: dict[str, Lineage]) -> Exception:
    """The one-line error for ``name``, which has no announced version: those that do."""
    from trainer.lineage import unknown_adapter

    announced = [a for a, lineage in lineages.items() if lineage.updates]
    return unknown_adapter(
        "ADAPTER", name, announced, f"the versions announced on {settings.topics.adapter_updates}"
    )


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
            settings.kafka_connection(),
            settings.topics.adapter_updates,
            show,
            from_beginning=from_beginning,
            count=count,
            timeout=timeout,
            on_status=lambda line: say(err, line),
            give_up_after=give_up_after,
            verifier=reader_verifier(settings),
        )
    )
    if count is not None and seen < count:
        err.print(f"only {seen} of {count} announcements within {timeout}s")
        raise typer.Exit(1)
