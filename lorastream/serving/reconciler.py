"""Server state out: serve's reconciler makes the inference server hold what should be loaded.

Per adapter that is its newest ``keep`` versions that pass every check (the promotion
gate first, then the base model and the files): what is missing is loaded in version
order, and a version that fell out of that set is unloaded ``drain`` seconds later
(requests in flight on it finish first: an unload does not wait for them). The newest
loaded version is the *live* one (:meth:`Reconciler.live`).

What the server holds is compared with what serve believes it holds: vLLM lists its
adapters in ``/v1/models``, polled every ``poll`` seconds; SGLang does not, so the load of
the oldest version serve believes loaded is sent again (loading is idempotent there): an
answer "loaded now" rather than "already loaded" means the server had forgotten it, so
every other version is loaded again too. A server that cannot be reached is retried with
backoff up to ``backoff_max``, and said again every ``unreachable_log_every`` seconds.

A load counts only once the server confirms it (:meth:`Backend.confirm`): one answered
with success that the server does not list is a failed load, logged and tried again with
backoff, and never routed to. A load refused for room (:class:`BackendFull`) teaches
serve the server's limit; :mod:`serving.capacity` decides which versions get the room, and
the rest are unloaded after their drain. Until an adapter's wanted version is in, its
newest loaded version stays live even while it drains, so the proxy never sends a request
to a version that is not loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from lorastream.serving.backends import Backend, Loaded, ModelCard
from lorastream.serving.capacity import Capacity, Retries
from lorastream.serving.config import ServeConfig
from lorastream.serving.exceptions import BackendFull, BackendRefused, BackendUnavailable
from lorastream.serving.metrics import ServeMetrics
from lorastream.serving.verify import (
    GATE_REASONS,
    Refusal,
    check_base,
    check_files,
    judge_versions,
)
from lorastream.serving.versions import Announced, parse_version_name, version_name
from trainer.exceptions import AdapterStoreError, ResourceError
from trainer.objects import fetch_version, is_remote

log = logging.getLogger(__name__)

__all__ = ["SGLANG_SWEEP", "Reconciler"]

# SGLang keeps no list serve can read: at start, this many versions just below the kept
# ones are unloaded (after the drain) in case an earlier serve left them loaded.
SGLANG_SWEEP = 16


class Reconciler:
    """Loads and unloads through ``backend`` until the server matches ``announced``."""

    def __init__(
        self,
        config: ServeConfig,
        announced: Announced,
        backend: Backend,
        metrics: ServeMetrics,
    ) -> None:
        self.config = config
        self.announced = announced
        self.versions = announced.versions
        self.backend = backend
        self.metrics = metrics
        self.loaded: dict[str, tuple[str, int]] = {}
        """server-side name → (adapter, version), as serve believes the server holds them."""
        self.retire_at: dict[str, float] = {}
        self.base: ModelCard | None = None
        self.ready = asyncio.Event()
        """Set after the first reconcile pass that reached the server."""
        self.capacity = Capacity()
        self.retries = Retries(config.backoff_start, config.backoff_max)
        self._live: dict[str, tuple[int, str]] = {}
        self._down_since: float | None = None
        self._down_said = 0.0
        self._last_probe = 0.0
        self._probe_now = True

    def live(self, adapter: str) -> str | None:
        """The server-side name of ``adapter``'s newest loaded version, or None."""
        entry = self._live.get(adapter)
        return entry[1] if entry else None

    def sweep(self) -> None:
        """SGLang: versions below the kept ones that an earlier serve may have left loaded."""
        for adapter, versions in self.versions.items():
            newest = sorted(versions.updates, reverse=True)
            for version in newest[self.config.keep : self.config.keep + SGLANG_SWEEP]:
                name = version_name(adapter, version)
                self.loaded.setdefault(name, (adapter, version))
                self.retire_at.setdefault(name, time.monotonic() + self.config.drain_seconds)

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile at every announcement, drain deadline and poll until ``stop`` is set;
        a server that cannot be reached is retried with backoff, never fatal."""
        backoff = self.config.backoff_start
        while not stop.is_set():
            self.announced.wake.clear()
            generation = self.announced.generation
            try:
                await self._reconcile()
            except BackendUnavailable as exc:
                self._probe_now = True
                now = time.monotonic()
                if self._down_since is None:
                    self._down_since = self._down_said = now
                    self.metrics.server_up.set(0)
                    log.warning("%s Retrying with backoff up to %gs.", exc, self.config.backoff_max)
                elif now - self._down_said >= self.config.unreachable_log_every:
                    self._down_said = now
                    log.warning(
                        "the inference server at %s is still unreachable after %.0fs (%s); "
                        "still retrying",
                        self.config.url,
                        now - self._down_since,
                        exc.reason,
                    )
                await self._sleep(backoff, stop)
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
            self.announced.handled = generation
            self.ready.set()
            await self._sleep(self._next_wait(), self.announced.wake)

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
        due = self.retries.next_due()
        if due is not None:
            wait = min(wait, due - time.monotonic())
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
        kept = {adapter: await self._kept(adapter) for adapter in sorted(self.versions)}
        wanted = self.capacity.wanted(kept, self.loaded.values())
        await self._retire(wanted)  # first: what it unloads makes room for what is wanted
        for adapter, versions in kept.items():
            for version in versions:
                name = version_name(adapter, version)
                if name in wanted and name not in self.loaded:
                    await self._load(adapter, version)
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
            self.capacity.forget()
        for name in listed - set(self.loaded):
            ours = parse_version_name(name)
            if ours is not None and ours[0] in self.versions:
                self.loaded[name] = ours

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
            self.capacity.forget()

    def judge(self, adapter: str) -> None:
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
            self.config.max_general_regression,
        )

    async def _kept(self, adapter: str) -> list[int]:
        """The newest ``keep`` versions that pass every check, the gate first, oldest first."""
        versions = self.versions[adapter]
        self.judge(adapter)
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
            logging.WARNING if refusal.reason in GATE_REASONS else logging.ERROR,
            "refused %s (%s): %s; %s",
            version_name(adapter, version),
            refusal.reason,
            refusal.detail,
            f"{live} stays live" if live else "no version of it is live",
        )

    async def _load(self, adapter: str, version: int) -> None:
        name = version_name(adapter, version)
        if self.retries.waiting(name):
            return
        path = self._path(adapter, version)
        try:
            answer = await self.backend.load(name, path)
        except BackendFull as exc:
            self.capacity.learn(len(self.loaded), self.config.url, name, exc.reason)
            log.info("%s waits for room (next try in %gs)", name, self.retries.failed(name))
            return
        except BackendRefused as exc:
            self._refuse(adapter, version, Refusal("server", exc.reason))
            return
        if await self.backend.confirm(name) is False:
            log.warning(
                "the inference server at %s answered the load of %s with success but does "
                "not list it (GET /v1/models): a failed load, never routed to; trying again "
                "in %gs",
                self.config.url,
                name,
                self.retries.failed(name),
            )
            self.metrics.unconfirmed.labels(adapter).inc()
            return
        self.retries.succeeded(name)
        self.loaded[name] = (adapter, version)
        self.retire_at.pop(name, None)
        if answer is Loaded.NEW:
            self.metrics.loads.labels(adapter).inc()
            log.info("loaded %s from %s", name, path)
        self._update_live()

    async def _retire(self, kept: set[str]) -> None:
        now = time.monotonic()
        for name in list(self.loaded):
            if name in kept:
                self.retire_at.pop(name, None)
                continue
            due = self.retire_at.setdefault(name, now + self.config.drain_seconds)
            if due > now:
                continue
            # Out of the routing before the server drops it: the proxy never sends a
            # request to a version that is on its way out (it may still be live while its
            # adapter's wanted version waits for room).
            entry = self.loaded.pop(name)
            del self.retire_at[name]
            self._update_live()
            try:
                if await self.backend.unload(name):
                    self.metrics.unloads.labels(entry[0]).inc()
                    log.info("unloaded %s after its %gs drain", name, self.config.drain_seconds)
            except BackendRefused as exc:
                log.error("%s It is left loaded.", exc)
            except BackendUnavailable:
                self.loaded[name], self.retire_at[name] = entry, due  # try again later
                raise

    def _update_live(self) -> None:
        newest: dict[str, int] = {}
        draining: dict[str, int] = {}
        for adapter, version in self.loaded.values():
            into = draining if version_name(adapter, version) in self.retire_at else newest
            if version > into.get(adapter, 0):
                into[adapter] = version
        # An adapter whose every loaded version drains (its wanted one waits for room)
        # keeps the newest of them live until it is unloaded: loaded still, so servable.
        for adapter, version in draining.items():
            newest.setdefault(adapter, version)
        for adapter, version in newest.items():
            if self._live.get(adapter, (0, ""))[0] != version:
                name = version_name(adapter, version)
                log.info("live: %s -> %s", adapter, name)
                self.metrics.live.labels(adapter).set(version)
            self._live[adapter] = (version, version_name(adapter, version))
        for adapter in set(self._live) - set(newest):
            del self._live[adapter]
            self.metrics.live.labels(adapter).set(0)
