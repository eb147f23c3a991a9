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
backoff up to ``backoff_max``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from lorastream.serving.backends import Backend, Loaded, ModelCard
from lorastream.serving.config import ServeConfig
from lorastream.serving.exceptions import BackendRefused, BackendUnavailable
from lorastream.serving.metrics import ServeMetrics
from lorastream.serving.verify import Refusal, check_base, check_files, judge_versions
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
        self._live: dict[str, tuple[int, str]] = {}
        self._down_since: float | None = None
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
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    self.metrics.server_up.set(0)
                    log.warning("%s Retrying with backoff up to %gs.", exc, self.config.backoff_max)
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
