"""Announcements in: serve's follower of ``adapter-updates``.

It reads the whole lineage at start, then follows the topic (read_committed, in a group
of its own per server, ``serving.instance``) and adds each trusted announcement that is its adapter's
next version to :class:`~lorastream.serving.versions.Announced`. A record's offset is
committed once a reconcile pass has handled the generation it arrived in, so a serve that
stops before the server saw a version reads that announcement again.
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from lorastream.serving.config import ServeConfig
from lorastream.serving.versions import AdapterVersions, Announced, version_name
from schemas import AdapterUpdate
from trainer.lineage import order_problem, read_announcement
from trainer.signing import Verifier

log = logging.getLogger(__name__)

__all__ = ["Follower"]


class Follower:
    """Reads announcements into ``announced``; :meth:`read_history` once, then :meth:`run`."""

    def __init__(self, config: ServeConfig, announced: Announced, verifier: Verifier) -> None:
        self.config = config
        self.announced = announced
        # One for the history and the topic: a skipped record is logged and counted once.
        self.verifier = verifier

    def announce(self, update: AdapterUpdate) -> bool:
        """Add ``update`` if serve follows its adapter; False when out of scope or known."""
        if not self.config.in_scope(update.adapter):
            return False
        return self.announced.add(update)

    async def read_history(self) -> None:
        """Every version announced so far, so the newest ``keep`` are known at start."""
        from trainer.history import load_lineages

        lineages = await load_lineages(
            self.config.kafka,
            self.config.updates_topic,
            verifier=self.verifier,
        )
        for lineage in lineages.values():
            for update in lineage.updates:
                self.announce(update)
        log.info("lineage read from %s: %s", self.config.updates_topic, self.announced.newest())

    async def run(self) -> None:
        """Follow the topic until cancelled; commit what a reconcile pass has handled."""
        from trainer.kafka import kafka_errors, stop_consumer

        servers = self.config.kafka.servers
        from lorastream.serving.instance import client_id

        timeout_ms = int(self.config.session_timeout * 1000)
        consumer = AIOKafkaConsumer(
            self.config.updates_topic,
            group_id=self.config.group_id,
            client_id=client_id(),
            session_timeout_ms=timeout_ms,
            heartbeat_interval_ms=max(100, timeout_ms // 3),
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            **self.config.kafka.client_kwargs(),
        )
        with kafka_errors(servers, f"following {self.config.updates_topic}"):
            await consumer.start()
        announced = self.announced
        pending: list[tuple[int, TopicPartition, int]] = []
        try:
            while True:
                with kafka_errors(servers, f"reading {self.config.updates_topic}"):
                    batch = await consumer.getmany(timeout_ms=500)
                for tp, records in batch.items():
                    for record in records:
                        if self._take(record):
                            announced.generation += 1
                            announced.wake.set()
                        pending.append((announced.generation, tp, record.offset + 1))
                done = [p for p in pending if p[0] <= announced.handled]
                if done:
                    offsets = {tp: offset for _, tp, offset in done}
                    with kafka_errors(servers, f"committing {self.config.group_id}"):
                        await consumer.commit(offsets)
                    pending = [p for p in pending if p[0] > announced.handled]
        finally:
            await stop_consumer(consumer)

    def _take(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        """Add the announcement in ``record`` if it is trusted and its adapter's next
        version; anything else is skipped (logged and counted once), never fatal."""
        update = read_announcement(record, self.verifier)
        if update is None or not self.config.in_scope(update.adapter):
            return False
        versions = self.announced.versions.get(update.adapter, AdapterVersions())
        problem = order_problem(
            max(versions.updates, default=0), versions.updates.get(update.version), update
        )
        if problem is not None:
            self.verifier.reject(record, *problem)
            return False
        if self.announce(update):
            log.info("announced: %s", version_name(update.adapter, update.version))
            return True
        return False
