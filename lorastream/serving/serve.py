"""The serve loop: every verified adapter version goes live in the inference server by itself.

Two tasks share one record of what is loaded:

- the *follower* reads ``adapter-updates`` (read_committed, group
  ``<prefix>lorastream-serve``) and adds each announcement to the adapter's versions;
  it commits a record's offset once a reconcile pass has handled it;
- the *reconciler* makes the server hold, per adapter, its newest ``keep`` verified
  versions: it loads what is missing in version order, and unloads a version that
  fell out of that set ``drain`` seconds later (requests in flight on it finish
  first: an unload does not wait for them).

The promotion gate (:func:`~lorastream.serving.verify.check_regression`) judges each
version, in version order, against the versions the gate let through before it (the
newest ``keep`` of them not refused otherwise): one whose held-out eval loss is worse
than the best of theirs by more than ``max_regression`` is refused and never loaded.
The verdicts depend on the announced eval losses (and the other refusals known by then),
not on how announcements were batched, so a serve that starts again reaches the same ones.

Names are never reused: version N of ``tutor`` is ``tutor-vN``, because reloading new
weights under a name vLLM has seen serves stale prefix-cache blocks, and
``load_inplace`` re-reads the files at every step. The newest loaded version is the
*live* one (:meth:`Serve.live`): the proxy sends ``model: tutor`` there.

At start the whole lineage is read (so the set of ``keep`` versions is known after a
restart of serve or of the server); what the server already holds is taken over, so
nothing is loaded twice. A server that lost its adapters (restarted) is noticed and
re-filled: vLLM lists its adapters in ``/v1/models``, polled every ``poll`` seconds;
SGLang does not, so serve re-sends the load of the oldest version it believes loaded
(loading is idempotent there): an answer "loaded now" rather than "already loaded"
means the server had forgotten it, so every other version is loaded again too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from lorastream.serving.backends import Backend, BackendKind, Loaded, ModelCard, make
from lorastream.serving.exceptions import BackendRefused, BackendUnavailable
from lorastream.serving.metrics import ServeMetrics
from lorastream.serving.verify import Refusal, check_base, check_files, judge_versions
from schemas import AdapterUpdate
from trainer.exceptions import AdapterStoreError, ResourceError
from trainer.lineage import order_problem, read_announcement
from trainer.objects import fetch_version, is_remote
from trainer.signing import Verifier

log = logging.getLogger(__name__)

__all__ = ["Serve", "ServeConfig", "version_name"]

# SGLang keeps no list serve can read: at start, this many versions just below the kept
# ones are unloaded (after the drain) in case an earlier serve left them loaded.
SGLANG_SWEEP = 16


def version_name(adapter: str, version: int) -> str:
    """The server-side name of one version: never reused, so never stale."""
    return f"{adapter}-v{version}"


_NAME = re.compile(r"^(?P<adapter>[A-Za-z0-9][A-Za-z0-9._-]{0,63})-v(?P<version>[1-9][0-9]*)$")


@dataclass(frozen=True)
class ServeConfig:
    """What serve needs; built from the settings by the CLI, never from the environment."""

    bootstrap_servers: str
    updates_topic: str
    group_id: str
    backend: BackendKind
    url: str
    keep: int = 2
    drain_seconds: float = 30.0
    max_regression: float = 0.02
    """Refuse a version whose eval loss exceeds the best live one's by more than this fraction."""
    adapters: frozenset[str] = frozenset()
    """Only these adapters (all when empty)."""
    max_lora_rank: int = 16
    served_base: str | None = None
    trainer_base: str | None = None
    poll_seconds: float = 5.0
    cache_dir: Path | None = None
    """Where versions announced on an object store (s3://…) are fetched to, checked, and
    loaded from (the server is given that local directory)."""
    backoff_start: float = 1.0
    backoff_max: float = 30.0
    client_options: dict[str, Any] = field(default_factory=dict)
    verifier: Verifier = field(default_factory=Verifier)
    """What serve trusts: the announcement key, and the adapter location a version's files
    must lie under (LORASTREAM_ADAPTER_DIR or its bucket); anything else is skipped."""

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError(f"keep must be at least 1, not {self.keep}")
        if self.drain_seconds < 0:
            raise ValueError(f"drain_seconds must be 0 or more, not {self.drain_seconds}")
        if not self.max_regression >= 0:
            raise ValueError(f"max_regression must be 0 or more, not {self.max_regression}")


@dataclass
class _Versions:
    """One adapter's announced versions and what serve concluded about each."""

    updates: dict[int, AdapterUpdate] = field(default_factory=dict)
    file_checks: dict[int, Refusal | None] = field(default_factory=dict)
    refused: dict[int, Refusal] = field(default_factory=dict)
    gate: dict[int, Refusal | None] = field(default_factory=dict)
    """The promotion gate's verdict on each version, made once, in version order."""
    local: dict[int, str] = field(default_factory=dict)
    """Where a version announced on an object store was fetched to."""

    @property
    def promoted(self) -> list[int]:
        """The versions the gate let through, oldest first."""
        return sorted(v for v, verdict in self.gate.items() if verdict is None)


class Serve:
    """The serve loop; :meth:`run` until :meth:`request_stop`, or cancel its task.

    ``live(adapter)`` is the server-side name of the adapter's newest live version;
    ``resolve(model)`` the ``model`` a request should carry upstream (SGLang's
    ``<base>:<name>`` form included); ``known(model)`` whether ``model`` is an adapter
    serve follows. The proxy uses the last two.
    """

    def __init__(
        self,
        config: ServeConfig,
        metrics: ServeMetrics | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or ServeMetrics()
        self.backend = backend or make(config.backend, config.url)
        # One for the history and the follower: a skipped record is logged and counted once.
        self.verifier = config.verifier.counting(self.metrics.reject)
        self.versions: dict[str, _Versions] = {}
        self.loaded: dict[str, tuple[str, int]] = {}
        """server-side name → (adapter, version), as serve believes the server holds them."""
        self.retire_at: dict[str, float] = {}
        self.base: ModelCard | None = None
        self.ready = asyncio.Event()
        """Set after the first reconcile pass that reached the server."""
        self._live: dict[str, tuple[int, str]] = {}
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._generation = 0
        self._handled_generation = -1
        self._down_since: float | None = None
        self._last_probe = 0.0
        self._probe_now = True

    # -- what the proxy reads --------------------------------------------------------------

    def live(self, adapter: str) -> str | None:
        """The server-side name of ``adapter``'s newest loaded version, or None."""
        entry = self._live.get(adapter)
        return entry[1] if entry else None

    def live_version(self, adapter: str) -> int | None:
        entry = self._live.get(adapter)
        return entry[0] if entry else None

    def known(self, model: str) -> bool:
        return model in self.versions

    def resolve(self, model: str) -> str | None:
        """The upstream ``model`` for a request naming adapter ``model``; None otherwise."""
        name = self.live(model)
        if name is None:
            return None
        base = self.base.id if self.base is not None else ""
        return self.backend.model_for(name, base)

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Read the lineage, then follow and reconcile until stopped; a task that fails
        stops the other and its error propagates."""
        async with self.backend:
            await self._read_history()
            self._wake.set()
            reconciler = asyncio.create_task(self._reconcile_loop(), name="serve-reconcile")
            follower = asyncio.create_task(self._follow(), name="serve-follow")
            stopper = asyncio.create_task(self._stop.wait(), name="serve-stop")
            tasks = {reconciler, follower, stopper}
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for task in done:
                if task is not stopper:
                    task.result()

    # -- Kafka -----------------------------------------------------------------------------

    def _in_scope(self, adapter: str) -> bool:
        return not self.config.adapters or adapter in self.config.adapters

    def _announce(self, update: AdapterUpdate) -> bool:
        if not self._in_scope(update.adapter):
            return False
        versions = self.versions.setdefault(update.adapter, _Versions())
        if update.version in versions.updates:
            return False
        versions.updates[update.version] = update
        return True

    async def _read_history(self) -> None:
        from trainer.history import load_lineages

        lineages = await load_lineages(
            self.config.bootstrap_servers,
            self.config.updates_topic,
            client_options=self.config.client_options,
            verifier=self.verifier,
        )
        for lineage in lineages.values():
            for update in lineage.updates:
                self._announce(update)
        if self.config.backend == "sglang":
            self._sweep_candidates()
        log.info(
            "lineage read from %s: %s",
            self.config.updates_topic,
            ", ".join(
                f"{a} v{max(v.updates)}" for a, v in sorted(self.versions.items()) if v.updates
            )
            or "no adapter versions yet",
        )

    def _sweep_candidates(self) -> None:
        """SGLang: versions below the kept ones that an earlier serve may have left loaded."""
        for adapter, versions in self.versions.items():
            newest = sorted(versions.updates, reverse=True)
            for version in newest[self.config.keep : self.config.keep + SGLANG_SWEEP]:
                name = version_name(adapter, version)
                self.loaded.setdefault(name, (adapter, version))
                self.retire_at.setdefault(name, time.monotonic() + self.config.drain_seconds)

    async def _follow(self) -> None:
        from trainer.kafka import kafka_errors, stop_consumer

        servers = self.config.bootstrap_servers
        consumer = AIOKafkaConsumer(
            self.config.updates_topic,
            bootstrap_servers=servers,
            group_id=self.config.group_id,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            **self.config.client_options,
        )
        with kafka_errors(servers, f"following {self.config.updates_topic}"):
            await consumer.start()
        pending: list[tuple[int, TopicPartition, int]] = []
        try:
            while True:
                with kafka_errors(servers, f"reading {self.config.updates_topic}"):
                    batch = await consumer.getmany(timeout_ms=500)
                for tp, records in batch.items():
                    for record in records:
                        if self._take(record):
                            self._generation += 1
                            self._wake.set()
                        pending.append((self._generation, tp, record.offset + 1))
                done = [p for p in pending if p[0] <= self._handled_generation]
                if done:
                    offsets = {tp: offset for _, tp, offset in done}
                    with kafka_errors(servers, f"committing {self.config.group_id}"):
                        await consumer.commit(offsets)
                    pending = [p for p in pending if p[0] > self._handled_generation]
        finally:
            await stop_consumer(consumer)

    def _take(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        """Add the announcement in ``record`` if it is trusted and its adapter's next
        version; anything else is skipped (logged and counted once), never fatal."""
        update = read_announcement(record, self.verifier)
        if update is None or not self._in_scope(update.adapter):
            return False
        versions = self.versions.get(update.adapter, _Versions())
        problem = order_problem(
            max(versions.updates, default=0), versions.updates.get(update.version), update
        )
        if problem is not None:
            self.verifier.reject(record, *problem)
            return False
        if self._announce(update):
            log.info("announced: %s", version_name(update.adapter, update.version))
            return True
        return False

    # -- the server ------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        backoff = self.config.backoff_start
        while not self._stop.is_set():
            self._wake.clear()
            generation = self._generation
            try:
                await self._reconcile()
            except BackendUnavailable as exc:
                self._probe_now = True
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    self.metrics.server_up.set(0)
                    log.warning("%s Retrying with backoff up to %gs.", exc, self.config.backoff_max)
                await self._sleep(backoff, self._stop)
                backoff = min(backoff * 2, self.config.backoff_max)
                continue
            if self._down_since is not None:
                log.warning(
                    "the inference server at %s is back after %.0fs; catching up",
                    self.config.url,
                    time.monotonic() - self._down_since,
                )
                self._down_since = None
            self.metrics.server_up.set(1)
            backoff = self.config.backoff_start
            self._handled_generation = generation
            self.ready.set()
            await self._sleep(self._next_wait(), self._wake)

    async def _sleep(self, seconds: float, event: asyncio.Event) -> None:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that
        # arrives as the event is set (request_stop does both).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(seconds, 0.0)):
                await event.wait()

    def _next_wait(self) -> float:
        wait = self.config.poll_seconds
        if self.retire_at:
            wait = min(wait, min(self.retire_at.values()) - time.monotonic())
        return wait

    async def _reconcile(self) -> None:
        cards = await self.backend.models()
        self.base = next((c for c in cards if c.parent is None), None)
        if self.base is None:
            raise BackendRefused(self.config.url, "GET /v1/models", "lists no base model")
        if self.backend.lists_adapters:
            self._compare({c.id for c in cards if c.parent is not None})
        else:
            await self._probe()
        for adapter in sorted(self.versions):
            for version in await self._kept(adapter):
                name = version_name(adapter, version)
                if name not in self.loaded:
                    await self._load(adapter, version)
        await self._retire()
        self._update_live()

    def _compare(self, listed: set[str]) -> None:
        """vLLM: forget what the server lost; take over what it holds that is ours."""
        lost = [name for name in self.loaded if name not in listed]
        if lost:
            log.warning(
                "the inference server at %s no longer holds %s (restarted?); loading again",
                self.config.url,
                ", ".join(sorted(lost)),
            )
            for name in lost:
                del self.loaded[name]
                self.retire_at.pop(name, None)
        for name in listed - set(self.loaded):
            match = _NAME.match(name)
            if match and match["adapter"] in self.versions:
                self.loaded[name] = (match["adapter"], int(match["version"]))

    async def _probe(self) -> None:
        """SGLang: re-send the load of one version serve believes loaded; "loaded now"
        means the server had forgotten it, and so everything (a restart)."""
        now = time.monotonic()
        if not self._probe_now and now - self._last_probe < self.config.poll_seconds:
            return
        kept = [(a, v) for a, v in self.loaded.values() if version_name(a, v) not in self.retire_at]
        if not kept:
            self._probe_now = False
            self._last_probe = now
            return
        adapter, version = min(kept, key=lambda av: (av[0], av[1]))
        name = version_name(adapter, version)
        answer = await self.backend.load(name, self._path(adapter, version))
        self._probe_now = False
        self._last_probe = now
        if answer is Loaded.NEW:
            log.warning(
                "the inference server at %s did not hold %s any more (restarted?); loading again",
                self.config.url,
                name,
            )
            self.metrics.loads.labels(adapter).inc()
            self.loaded = {name: (adapter, version)}
            self.retire_at.clear()

    def _judge(self, adapter: str) -> None:
        """The gate's verdict on every version it has not judged yet, in version order
        (:func:`~lorastream.serving.verify.judge_versions`), against serve's live set as
        it stood: versions another check refused never count."""
        versions = self.versions[adapter]
        judge_versions(
            versions.updates,
            versions.gate,
            self.config.keep,
            self.config.max_regression,
            versions.refused,
        )

    async def _kept(self, adapter: str) -> list[int]:
        """The newest ``keep`` versions that pass every check, the gate first, oldest first."""
        versions = self.versions[adapter]
        self._judge(adapter)
        kept: list[int] = []
        for version in sorted(versions.updates, reverse=True):
            if len(kept) == self.config.keep:
                break
            if version in versions.refused:
                continue
            try:
                refusal = versions.gate[version] or await self._check(adapter, version)
            except ResourceError as exc:  # the object store is away: try again later
                log.warning("%s: %s; trying again", version_name(adapter, version), exc)
                continue
            if refusal is None:
                kept.append(version)
            else:
                self._refuse(adapter, version, refusal)
        return sorted(kept)

    async def _check(self, adapter: str, version: int) -> Refusal | None:
        versions = self.versions[adapter]
        update = versions.updates[version]
        assert self.base is not None
        refusal = check_base(update, self.base, self.config.served_base, self.config.trainer_base)
        if refusal is not None:
            return refusal
        if version not in versions.file_checks:
            if is_remote(update.uri):
                try:
                    local = await asyncio.to_thread(self._fetch, update.uri)
                except AdapterStoreError as exc:
                    versions.file_checks[version] = Refusal("missing", str(exc))
                    return versions.file_checks[version]
                versions.local[version] = str(local)
                update = update.model_copy(update={"uri": str(local)})
            versions.file_checks[version] = await asyncio.to_thread(
                check_files, update, self.config.max_lora_rank
            )
        return versions.file_checks[version]

    def _fetch(self, uri: str) -> Path:
        if self.config.cache_dir is None:
            raise AdapterStoreError(f"{uri} is on an object store, and serve has no cache dir")
        return fetch_version(uri, self.config.cache_dir)

    def _path(self, adapter: str, version: int) -> str:
        """What the server loads: the announced directory, or the fetched copy."""
        versions = self.versions[adapter]
        return versions.local.get(version, versions.updates[version].uri)

    def _refuse(self, adapter: str, version: int, refusal: Refusal) -> None:
        self.versions[adapter].refused[version] = refusal
        self.metrics.refusals.labels(adapter, refusal.reason).inc()
        live = self.live(adapter)
        # A regression is the gate doing its job; the other reasons are faults to fix.
        log.log(
            logging.WARNING if refusal.reason == "regression" else logging.ERROR,
            "refused %s (%s): %s; %s",
            version_name(adapter, version),
            refusal.reason,
            refusal.detail,
            f"{live} stays live" if live else "no version of it is live",
        )

    async def _load(self, adapter: str, version: int) -> None:
        name = version_name(adapter, version)
        path = self._path(adapter, version)
        try:
            answer = await self.backend.load(name, path)
        except BackendRefused as exc:
            self._refuse(adapter, version, Refusal("server", exc.reason))
            return
        self.loaded[name] = (adapter, version)
        self.retire_at.pop(name, None)
        if answer is Loaded.NEW:
            self.metrics.loads.labels(adapter).inc()
            log.info("loaded %s from %s", name, path)
        self._update_live()

    async def _retire(self) -> None:
        kept = {version_name(a, v) for a in self.versions for v in await self._kept(a)}
        now = time.monotonic()
        for name in list(self.loaded):
            if name in kept:
                self.retire_at.pop(name, None)
                continue
            due = self.retire_at.setdefault(name, now + self.config.drain_seconds)
            if due > now:
                continue
            adapter, _ = self.loaded[name]
            try:
                if await self.backend.unload(name):
                    self.metrics.unloads.labels(adapter).inc()
                    log.info("unloaded %s after its %gs drain", name, self.config.drain_seconds)
            except BackendRefused as exc:
                log.error("%s It is left loaded.", exc)
            del self.loaded[name]
            del self.retire_at[name]

    def _update_live(self) -> None:
        newest: dict[str, int] = {}
        for adapter, version in self.loaded.values():
            if version_name(adapter, version) in self.retire_at:
                continue
            if version > newest.get(adapter, 0):
                newest[adapter] = version
        for adapter, version in newest.items():
            if self._live.get(adapter, (0, ""))[0] != version:
                name = version_name(adapter, version)
                log.info("live: %s -> %s", adapter, name)
                self.metrics.live.labels(adapter).set(version)
            self._live[adapter] = (version, version_name(adapter, version))
        for adapter in set(self._live) - set(newest):
            del self._live[adapter]
            self.metrics.live.labels(adapter).set(0)
