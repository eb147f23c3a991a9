"""What the live trainer shows of its input: each partition's lag, and the events that wait.

Two gauges and one log line, kept apart from the consumer loop that feeds
them: the lag of every assigned ``learning-events`` partition after each poll,
and, when the input goes quiet, the events that wait in open windows (so a
partial window is never invisible).
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError

from trainer.metrics import TrainerMetrics

__all__ = ["Progress", "at"]

# The live trainer's lines, under the name they have always had in its log.
log = logging.getLogger("trainer.consumer")


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

    async def report_lag(self, consumer: AIOKafkaConsumer) -> None:
        """The lag gauge of each assigned partition: its highwater (known once fetched from)
        minus the fetch position. Partitions no longer assigned drop out of the gauge."""
        assigned = consumer.assignment()
        for tp in self._lag_labels - assigned:
            self.metrics.lag.remove(tp.topic, str(tp.partition))
        self._lag_labels &= assigned
        for tp in assigned:
            try:
                highwater = consumer.highwater(tp)
                if highwater is None:
                    continue
                position = await consumer.position(tp)
            except (AssertionError, IllegalStateError):
                continue  # revoked meanwhile: the next poll sees the new assignment
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - position))
            self._lag_labels.add(tp)

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
