"""Repair: an adapter's files rebuilt from the log, bit for bit as they were announced.

An adapter whose files are missing or corrupt is held by the trainer
(:class:`~trainer.exceptions.AdapterHeld`). ``adapters repair NAME`` mends it
without touching what was announced: it reads NAME's lineage from
``adapter-updates``, checks every version's files against its announcement,
and retrains the lineage from the base model through the live trainer's own
rule (:meth:`~trainer.window.Windows.offer`, quarantined windows skipped) and
core, into a scratch directory. Each version it retrains must match its
announcement (manifest and weights) bit for bit; only then is a bad
version's directory set aside (``.v<N>.corrupt-<id>``, kept for a look) and
the rebuilt one put in its place. A version that cannot be reproduced (other
settings, another device, events the log no longer holds) is an error that
says which, and nothing is changed.

Versions on disk above the newest announced one were never announced (a
crash between writing and committing, or a writer that did not own the
name): they are set aside too (``.v<N>.unannounced-<id>``), so that the
version number is free for the announcement that will use it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiokafka import TopicPartition

from schemas import AdapterUpdate, SchemaError
from trainer.config import ReplayConfig
from trainer.core import Trained, WindowTrainer
from trainer.exceptions import AdapterStoreError, ReplayError
from trainer.history import LineageLog
from trainer.lineage import Lineage
from trainer.objects import restore_version
from trainer.ranges import read_range, resolve_range
from trainer.replay import learning_event_decoder
from trainer.store import AdapterStore
from trainer.window import Windows

__all__ = ["Fault", "RepairReport", "check_lineage", "repair"]

log = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"^v([0-9]+)$")


@dataclass(frozen=True)
class Fault:
    version: int
    reason: str


@dataclass
class RepairReport:
    adapter: str
    versions: int  # announced
    faults: list[Fault] = field(default_factory=list)  # as found, before the repair
    restored: list[int] = field(default_factory=list)
    set_aside: list[Path] = field(default_factory=list)  # unannounced or corrupt directories
    retrained: int = 0


def check_lineage(store: AdapterStore, updates: list[AdapterUpdate]) -> list[Fault]:
    """Every version of a lineage whose files are not as announced, with the reason."""
    faults = []
    for update in updates:
        try:
            store.verify(update.adapter, update.version, update.manifest_sha256, update.sha256)
        except AdapterStoreError as exc:
            faults.append(Fault(update.version, str(exc)))
    return faults


def _unannounced(store: AdapterStore, adapter: str, newest: int) -> list[Path]:
    directory = store.root / adapter
    if store.url is not None or not directory.is_dir():
        return []  # on an object store, a version without its announcement is never read
    found = []
    for entry in directory.iterdir():
        match = _VERSION_DIR.match(entry.name)
        if match and int(match.group(1)) > newest and entry.is_dir():
            found.append(entry)
    return sorted(found)


def _set_aside(directory: Path, why: str) -> Path:
    aside = directory.parent / f".{directory.name}.{why}-{uuid.uuid4().hex[:8]}"
    os.rename(directory, aside)
    return aside


async def repair(config: ReplayConfig, adapter: str, dry_run: bool = False) -> RepairReport:
    """Check ``adapter``'s files and rebuild the bad ones (see the module docstring)."""
    history = LineageLog(
        config.kafka,
        config.topics.adapter_updates,
        config.topics.quarantine,
        verifier=config.verifier,  # only what the trainer's own readers trust
    )
    lineages = await history.refresh()
    lineage = lineages.get(adapter)
    if lineage is None or not lineage.updates:
        raise ReplayError(
            f"no version of adapter {adapter!r} is announced on {config.topics.adapter_updates}"
        )
    store = AdapterStore(config.training.adapter_dir, cache=config.training.cache_dir)
    report = RepairReport(adapter, lineage.version)
    report.faults = check_lineage(store, lineage.updates)
    leftovers = _unannounced(store, adapter, lineage.version)
    if dry_run:
        report.set_aside = leftovers
        return report
    for directory in leftovers:
        report.set_aside.append(_set_aside(directory, "unannounced"))
    if report.faults:
        await _rebuild(config, store, lineage, report)
    return report


async def _rebuild(
    config: ReplayConfig, store: AdapterStore, lineage: Lineage, report: RepairReport
) -> None:
    bad = {f.version for f in report.faults}
    last = max(bad)
    announced = {u.version: u for u in lineage.updates}
    with tempfile.TemporaryDirectory(prefix="lorastream-repair-") as scratch:
        training = replace(config.training, adapter_dir=Path(scratch), faults=None)
        core = await asyncio.to_thread(WindowTrainer.load, training)
        shadow = Lineage(lineage.adapter)
        windows = Windows(training.window_size, training.eval_fraction)
        ranges = await resolve_range(config.kafka, config.topic)
        decoder = learning_event_decoder(lineage.adapter)
        batches = read_range(config.kafka, ranges)
        async with aclosing(batches):
            async for batch in batches:
                for record in batch:
                    try:
                        event = decoder(record)
                    except SchemaError:
                        continue
                    if event is None:
                        continue
                    tp = TopicPartition(record.topic, record.partition)
                    _, closed = windows.offer(tp, record.offset, event, shadow)
                    if closed is None:
                        continue
                    spec = closed.spec()
                    if (
                        spec.topic,
                        spec.partition,
                        spec.last_offset,
                    ) in lineage.quarantined_windows:
                        shadow.record_quarantine(spec)
                        windows.settle(closed)
                        continue
                    version = shadow.version + 1
                    update = announced.get(version)
                    # Its group (the adapters it was stepped with) is no part of the window.
                    if update is None or update.window.model_copy(update={"group": None}) != spec:
                        raise ReplayError(
                            f"{lineage.adapter} v{version}: the log no longer gives the window "
                            f"it was trained on ({spec.topic}[{spec.partition}]@"
                            f"{spec.first_offset}..{spec.last_offset} now); cannot repair"
                        )
                    # A window stepped in a group is stepped in that group's shape again.
                    group = update.window.group
                    outcome = await asyncio.to_thread(core.train, closed, shadow, group)
                    if not isinstance(outcome, Trained):
                        raise ReplayError(
                            f"{lineage.adapter} v{version}: retraining failed ({outcome.error})"
                        )
                    _check_same(outcome.update, update, training.adapter_dir)
                    report.retrained += 1
                    shadow.record(outcome.update)
                    windows.settle(closed)
                    if version in bad:
                        rebuilt = Path(scratch) / lineage.adapter / f"v{version}"
                        _restore(store, update, rebuilt)
                        report.restored.append(version)
                        log.warning("%s v%d: restored as announced", lineage.adapter, version)
                    if version >= last:
                        return
    missing = sorted(bad - set(report.restored))
    raise ReplayError(
        f"{lineage.adapter}: the log's events end before v{missing[0]}'s window; cannot repair "
        f"v{', v'.join(map(str, missing))}"
    )


def _check_same(rebuilt: AdapterUpdate, announced: AdapterUpdate, scratch: Path | str) -> None:
    if rebuilt.sha256 == announced.sha256 and (
        announced.manifest_sha256 is None or rebuilt.manifest_sha256 == announced.manifest_sha256
    ):
        return
    raise ReplayError(
        f"{announced.adapter} v{announced.version} retrained from the log is not the version "
        f"announced (weights sha256 {rebuilt.sha256[:16]}…, announced {announced.sha256[:16]}…); "
        "repair needs the settings it was trained with (seed, learning rate, steps per window, "
        "evaluation fraction and size, base model) on the CPU; nothing was changed"
    )


def _restore(store: AdapterStore, update: AdapterUpdate, rebuilt: Path) -> None:
    """Put the rebuilt directory (checked: it is the announced version) in place of the
    bad one, which is set aside; on an object store, upload it over the bad files."""
    if store.url is not None:
        restore_version(rebuilt, store.uri_of(update.adapter, update.version))
        return
    final = store.version_dir(update.adapter, update.version)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(rebuilt, staging)
    try:
        if final.exists():
            _set_aside(final, "corrupt")
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    store.verify(update.adapter, update.version, update.manifest_sha256, update.sha256)
