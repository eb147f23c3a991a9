"""The serve loop: every verified adapter version goes live in the inference server by itself.

Two tasks share one record of what was announced (``serving.versions``):

- the *follower* (``serving.follower``) reads ``adapter-updates`` (read_committed, in a
  group of its own per server: ``serving.instance``) and adds each announcement to the adapter's versions;
  it commits a record's offset once a reconcile pass has handled it;
- the *reconciler* (``serving.reconciler``) makes the server hold, per adapter, its
  newest ``keep`` verified versions: it loads what is missing in version order, and
  unloads a version that fell out of that set ``drain`` seconds later (requests in
  flight on it finish first: an unload does not wait for them).

The promotion gate (:func:`~lorastream.serving.verify.check_regression`) judges each
version, in version order, against the versions the gate let through before it (the
newest ``keep`` of them not refused otherwise): one whose held-out eval loss is worse
than the best of theirs by more than ``max_regression`` is refused and never loaded.
With ``max_general_regression``, one whose loss on the general set is worse than the
base model's by more than that (:func:`~lorastream.serving.verify.check_general`) is
refused first, the same way.
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
from typing import IO

from lorastream.serving.backends import Backend, make
from lorastream.serving.config import ServeConfig
from lorastream.serving.follower import Follower
from lorastream.serving.metrics import ServeMetrics
from lorastream.serving.reconciler import Reconciler
from lorastream.serving.versions import AdapterVersions, Announced, version_name

__all__ = ["Serve", "ServeConfig", "version_name"]


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
        self.announced = Announced()
        self.versions: dict[str, AdapterVersions] = self.announced.versions
        self.follower = Follower(
            config, self.announced, config.verifier.counting(self.metrics.reject)
        )
        self.reconciler = Reconciler(config, self.announced, self.backend, self.metrics)
        self.ready = self.reconciler.ready
        """Set after the first reconcile pass that reached the server."""
        self._stop = asyncio.Event()
        self._lock: IO[bytes] | None = None
        self._claimed = False

    # -- what the proxy reads --------------------------------------------------------------

    def live(self, adapter: str) -> str | None:
        """The server-side name of ``adapter``'s newest loaded version, or None."""
        return self.reconciler.live(adapter)

    def known(self, model: str) -> bool:
        return model in self.versions

    def resolve(self, model: str) -> str | None:
        """The upstream ``model`` for a request naming adapter ``model``; None otherwise."""
        name = self.live(model)
        if name is None:
            return None
        base = self.reconciler.base
        return self.backend.model_for(name, base.id if base is not None else "")

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()
        self.announced.wake.set()

    async def claim(self) -> None:
        """Refuse to start (:class:`~lorastream.serving.exceptions.ServeClash`) while
        another serve feeds this server; :meth:`run` claims first if this was not called.
        The claim (a lock file) is held until :meth:`run` returns."""
        from lorastream.serving.instance import claim

        if self._claimed:
            return
        config = self.config
        self._lock = await claim(
            config.kafka,
            config.group_id,
            config.server,
            config.lock_dir,
            within=config.session_timeout + 2.0,
        )
        self._claimed = True

    async def run(self) -> None:
        """Read the lineage, then follow and reconcile until stopped; a task that fails
        stops the other and its error propagates."""
        await self.claim()
        try:
            await self._run()
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            self._claimed = False

    async def _run(self) -> None:
        async with self.backend:
            await self.follower.read_history()
            if self.config.backend == "sglang":
                self.reconciler.sweep()
            self.announced.wake.set()
            reconciler = asyncio.create_task(
                self.reconciler.run(self._stop), name="serve-reconcile"
            )
            follower = asyncio.create_task(self.follower.run(), name="serve-follow")
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
