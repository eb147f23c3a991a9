"""``lorastream adapters follow``: committed announcements as they come."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiokafka.errors import KafkaError

from schemas import AdapterUpdate
from schemas.errors import KafkaUnavailableError
from trainer.committed import topic_partitions
from trainer.kafka import KafkaConnection, reader
from trainer.lineage import order_problem, read_announcement
from trainer.signing import Verifier

__all__ = ["follow"]

PROBE_EVERY = 5.0  # seconds without a record before asking the cluster whether it is there
PROBE_TIMEOUT = 10.0


async def follow(
    kafka: KafkaConnection,
    topic: str,
    on_update: Callable[[AdapterUpdate, bytes], None],
    *,
    from_beginning: bool = False,
    count: int | None = None,
    timeout: float | None = None,
    on_status: Callable[[str], None] | None = None,
    give_up_after: float = 60.0,
    verifier: Verifier | None = None,
) -> int:
    """Call ``on_update`` for each committed AdapterUpdate; return how many were seen.

    Reads without a consumer group (every follower sees everything) and with
    ``read_committed``, so an announcement appears only once its transaction,
    and so its window's offsets, are committed.

    ``on_status`` hears one line when following starts, one when the cluster stops
    answering and one when it answers again. A cluster silent for ``give_up_after``
    seconds is a KafkaUnavailableError: the client would otherwise retry forever.

    Only what ``verifier`` trusts is shown, and only each adapter's next version: the
    topic is read from its beginning either way (silently up to where it ended at the
    start, without ``from_beginning``), so that a forged "v99" is known for what it is.
    """
    say = on_status or (lambda _line: None)
    verifier = verifier or Verifier()
    lineages: dict[str, dict[int, AdapterUpdate]] = {}
    seen = 0
    loop = asyncio.get_running_loop()
    servers = kafka.servers
    async with reader(kafka, f"following {topic}") as consumer:
        tps = await topic_partitions(consumer, topic, servers)
        consumer.assign(tps)
        silent_until = {} if from_beginning else await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        if from_beginning:
            say(f"following {topic} on {servers} from the beginning")
        else:
            say(
                f"following {topic} on {servers} from now: new announcements only "
                "(--from-beginning for those made so far; `adapters list` for the lineage)"
            )
        deadline = None if timeout is None else loop.time() + timeout
        answered = quiet_since = loop.time()
        lost = False
        while count is None or seen < count:
            if deadline is not None and loop.time() >= deadline:
                break
            batch = await consumer.getmany(timeout_ms=500)
            if batch:
                answered = quiet_since = loop.time()
            for tp, records in batch.items():
                for record in records:
                    update = read_announcement(record, verifier)
                    if update is None:
                        continue
                    versions = lineages.setdefault(update.adapter, {})
                    problem = order_problem(
                        max(versions, default=0), versions.get(update.version), update
                    )
                    if problem is not None:
                        verifier.reject(record, *problem)
                        continue
                    if update.version in versions:
                        continue  # read again
                    versions[update.version] = update
                    if record.offset < silent_until.get(tp, 0):
                        continue  # made before following began
                    on_update(update, record.value or b"")
                    seen += 1
                    if seen == count:
                        return seen  # the rest of the batch is not shown: -n stops at n
            if loop.time() - quiet_since < PROBE_EVERY:
                continue
            quiet_since = loop.time()
            try:
                await asyncio.wait_for(consumer.topics(), PROBE_TIMEOUT)
            except (KafkaError, TimeoutError) as exc:
                silent = loop.time() - answered
                if silent >= give_up_after:
                    raise KafkaUnavailableError(
                        servers,
                        f"following {topic}",
                        f"no answer for {silent:.0f}s ({type(exc).__name__})",
                    ) from exc
                if not lost:
                    lost = True
                    say(
                        f"Kafka at {servers} does not answer ({type(exc).__name__}); "
                        f"retrying for up to {give_up_after:.0f}s"
                    )
            else:
                answered = loop.time()
                if lost:
                    lost = False
                    say(f"Kafka at {servers} answers again; following {topic}")
    return seen
