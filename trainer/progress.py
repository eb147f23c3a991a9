"""What the live trainer shows of its input: each partition's lag, and the events that wait.

Two gauges and one log line, kept apart from the consumer loop that feeds
them: the lag of every assigned ``learning-events`` partition after each poll,
and, when the input goes quiet, the events that wait in open windows (so a
partial window is never invisible).

The lag is lorastream's one lag (:class:`lorastream.ops.status.GroupLag`, what
``status`` and ``adapters list`` show): the end offset a ``read_committed``
reader sees minus the offset the trainer's group has committed, the log start
where it has committed none. The trainer's committed offset never passes an
open window's first event, so the events that wait count in it; a fetch
position would not (a lag of 0 while events wait, as before).
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from trainer.metrics import TrainerMetrics

__all__ = ["Progress", "at"]

# The live trainer's lines, under the name they have always had in its log.
log = logging.getLogger("trainer.consumer")

# How often the group's committed offsets are asked for (one round trip to the group
# coordinator), and how long that may take before the old ones serve another while.
COMMITTED_EVERY = 2.0
COMMITTED_TIMEOUT = 2.0


class Progress:
    """The lag and pending gauges of one live trainer, and its "waiting for" line."""

    def __init__(
        self, metrics: TrainerMetrics, window_size: int, max_wait_seconds: float | None
    ) -> None:
        self.metrics = metrics
        self.window_size = window_size
        self.max_wait_seconds = max_wait_seconds
        self._pending: dict[str, int] = {}  # what the log last said waits in open windows
        self._lag_labels: set[TopicPartition] = set()  # partitions the lag gauge shows
        self._committed: dict[TopicPartition, int] = {}  # the group's, as last asked
        self._committed_at: float | None = None

    async def report_lag(self, consumer: AIOKafkaConsumer) -> None:
        """The lag gauge of each assigned partition (see the module docstring): its last
        stable offset (known once fetched from) minus the group's committed offset, asked
        for every :data:`COMMITTED_EVERY` seconds. Partitions no longer assigned drop out."""
        assigned = consumer.assignment()
        for tp in self._lag_labels - assigned:
            self.metrics.lag.remove(tp.topic, str(tp.partition))
        self._lag_labels &= assigned
        await self._refresh_committed(consumer, assigned)
        for tp in assigned:
            try:
                end = consumer.last_stable_offset(tp)
            except (AssertionError, IllegalStateError):
                continue  # revoked meanwhile: the next poll sees the new assignment
            committed = self._committed.get(tp)
            if end is None or end < 0 or committed is None:
                continue
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, end - committed))
            self._lag_labels.add(tp)

    async def _refresh_committed(
        self, consumer: AIOKafkaConsumer, assigned: set[TopicPartition]
    ) -> None:
        """Ask the group coordinator for the committed offsets of ``assigned`` (the log start
        of a partition with none), when due or when a partition is new. A coordinator that
        does not answer in time leaves the old ones: the gauge lags, the loop does not wait."""
        now = asyncio.get_running_loop().time()
        new = assigned - self._committed.keys()
        due = self._committed_at is None or now - self._committed_at >= COMMITTED_EVERY
        if not assigned or not (due or new):
            return
        self._committed_at = now
        try:
            async with asyncio.timeout(COMMITTED_TIMEOUT):
                tps = sorted(assigned)
                offsets = await asyncio.gather(*(consumer.committed(tp) for tp in tps))
                committed = dict(zip(tps, offsets, strict=True))
                never = [tp for tp, offset in committed.items() if offset is None]
                starts = await consumer.beginning_offsets(never) if never else {}
        except (KafkaError, TimeoutError, AssertionError, IllegalStateError):
            return
        self._committed = {
            tp: offset if offset is not None else starts[tp] for tp, offset in committed.items()
        }

    def report_pending(self, pending: dict[str, int]) -> None:
        """When the input goes quiet, say which events wait in open windows (``pending``,
        per adapter; once per change); the gauge follows every change."""
        for adapter in self._pending.keys() - pending.keys():
            self.metrics.pending.labels(adapter).set(0)
        for adapter, count in pending.items():
            self.metrics.pending.labels(adapter).set(count)
        if pending == self._pending:
            return
        self._pending = pending
        if not pending:
            return
        size = self.window_size
        wait = self.max_wait_seconds
        log.info(
            "waiting for full windows of %d: %s; %s",
            size,
            ", ".join(f"{a} {n}/{size}" for a, n in sorted(pending.items())),
            f"a partial window trains after {wait:g}s"
            if wait
            else "partial windows wait (LORASTREAM_MAX_WAIT_SECONDS to train them)",
        )


def at(tp: TopicPartition, offset: int) -> dict[str, object]:
    """A log record's Kafka position, for ``--log-format json``."""
    return {"topic": tp.topic, "partition": tp.partition, "offset": offset}
