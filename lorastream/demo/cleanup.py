"""The demo's clean-up, on success, failure, Ctrl-C and SIGTERM alike: the workers are
stopped (their logs shown first after a failure); unless ``--keep`` the run's topics are
deleted and its temporary directory (data, logs, adapters) removed, only the picture
staying, and with ``--keep`` what stays is listed; a broker the run started is stopped.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
from collections.abc import Callable

from rich.markup import escape

from lorastream.demo.run import Run
from lorastream.dev.process import kill_group, signal_group

__all__ = ["clean_up", "signal_workers"]

_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # Faust's worker hides and shows the cursor


def clean_up(run: Run) -> None:
    """Stop the workers; unless --keep, delete the topics and the temporary directory;
    stop the broker if this run started it. Each step runs even if one before failed."""
    _stop_workers(run)
    if run.failed:
        _show_logs(run)
    if not run.keep:
        run.stage(7, "Clean-up")
        _attempt(run, "delete the topics", _delete_topics)
        _attempt(run, "remove the temporary directory", _remove_files)
    else:
        _show_kept(run)
    if run.broker is not None:
        _attempt(run, "stop the broker", _stop_broker)
    if not (run.failed or run.interrupted):
        run.console.rule(f"[bold green]done in {run.clock()}", align="left")


def signal_workers(run: Run) -> list[subprocess.Popen[bytes]]:
    """SIGTERM every worker still running, all before any is waited for, so that they
    shut down side by side. Those signalled."""
    return [p for p in run.workers.values() if signal_group(p, signal.SIGTERM)]


def _stop_workers(run: Run) -> None:
    for process in signal_workers(run):
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            kill_group(process)


def _attempt(run: Run, what: str, step: Callable[[Run], None]) -> None:
    try:
        step(run)
    except Exception as exc:
        run.plain(f"could not {what}: {type(exc).__name__}: {exc}")


def _show_logs(run: Run, lines: int = 15) -> None:
    for name in run.workers:
        log = run.logs / f"{name}.log"
        if not log.is_file():
            continue
        text = _TERMINAL_CODES.sub("", log.read_text(errors="replace"))
        tail = [line for line in text.splitlines() if line.strip()][-lines:]
        run.say(f"[bold]last lines of the {name}'s log[/] ({log}):")
        for line in tail:
            run.plain(f"  {line}")


def _delete_topics(run: Run) -> None:
    if not run.topics_made:
        return
    from lorastream.ops.admin import delete_topics, list_topics

    async def delete() -> list[str]:
        # The prefix was checked to be unused before the run, so every topic under it is
        # the run's: its five, and any the scorer's Faust app made for itself.
        found = await list_topics(run.kafka, run.prefix)
        return await delete_topics(run.kafka, [t.name for t in found])

    deleted = asyncio.run(delete())
    run.say(f"deleted {len(deleted)} topics {escape(run.prefix)}* on {run.bootstrap}")


def _remove_files(run: Run) -> None:
    removed = []
    if run.workers:  # the scorer's Faust state, under the run's own app id
        faust = run.settings.home / "faust" / run.settings.scorer_app_id
        shutil.rmtree(faust, ignore_errors=True)
        removed.append(str(faust))
    if run.work is not None:
        shutil.rmtree(run.work)
        removed.insert(0, f"{run.work} (data, logs, adapters)")
    if removed:
        run.say(f"removed {' and '.join(removed)}")
    if run.results.is_dir() and not any(run.results.iterdir()):
        run.results.rmdir()
    elif run.results.is_dir():
        run.say(f"kept {run.results} (the picture)")


def _stop_broker(run: Run) -> None:
    run.broker.stop()
    run.say("stopped the local broker this run started")


def _show_kept(run: Run) -> None:
    run.stage(7, "Kept (--keep)")
    run.plain(f"topics    {run.prefix}* on {run.bootstrap}")
    run.plain(f"adapters  {run.adapters}/<adapter>/v<version>/")
    run.plain(f"files     {run.logs} (data, logs, picture)")
    run.plain(
        f"look      LORASTREAM_TOPIC_PREFIX={run.prefix} lorastream adapters list "
        "(or dead-letters list)"
    )
    run.plain(f"delete    lorastream topics delete --prefix {run.prefix} --yes")
