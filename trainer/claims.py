"""Who else is running: the live members of a consumer group, and a lock per instance.

Two processes that must not both run (two trainers with one transactional id, two serves
for one inference server) find each other in two ways, and a stage checks both at start:

- on one machine, :func:`hold_lock` takes an exclusive ``flock`` on a file named after
  the instance; the kernel drops it when the process dies, however it dies, so a restart
  after a crash finds it free at once;
- across machines, :func:`group_members` lists the members of the consumer group the
  instance joins, with the ``client_id`` each one gave. A member that crashed stays listed
  until its session times out, so :func:`wait_until_gone` gives it that long to leave
  before a caller calls it a clash.

aiokafka's ``describe_consumer_groups`` cannot read a Kafka 4 broker's answer (its v3
request is paired with the v2 response layout), so :class:`_DescribeGroups` asks in v2.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiokafka.protocol.admin import DescribeGroupsRequest, DescribeGroupsRequest_v2

from trainer.kafka import KafkaConnection, admin_client, kafka_errors, send_to_node

__all__ = ["Member", "group_members", "hold_lock", "wait_until_gone"]


@dataclass(frozen=True)
class Member:
    """One live member of a consumer group, as its coordinator describes it."""

    member_id: str
    client_id: str
    host: str  # as the broker saw the connection, e.g. "/10.0.0.7"

    def __str__(self) -> str:
        return f"{self.client_id} on {self.host.lstrip('/')}"


class _DescribeGroups(DescribeGroupsRequest):
    """DescribeGroups in v2, the newest version whose response aiokafka decodes right."""

    def prepare(self, versions: dict[int, tuple[int, int]]) -> Any:
        return self.build(DescribeGroupsRequest_v2)


async def group_members(kafka: KafkaConnection, group_id: str) -> list[Member]:
    """The members of ``group_id`` now; empty for a group nobody has joined (or that is
    rebalancing with no one left)."""
    doing = f"describing consumer group {group_id}"
    async with admin_client(kafka, doing) as admin:
        with kafka_errors(kafka.servers, doing):
            node = await admin.find_coordinator(group_id)
            response = await send_to_node(admin, node, _DescribeGroups([group_id]))
    members: list[Member] = []
    for group in response.to_object()["groups"]:
        for member in group["members"]:
            members.append(Member(member["member_id"], member["client_id"], member["client_host"]))
    return members


async def wait_until_gone(
    kafka: KafkaConnection,
    group_id: str,
    match: Callable[[Member], bool],
    within: float,
    poll: float = 1.0,
) -> list[Member]:
    """The members of ``group_id`` that ``match`` and are still there after ``within``
    seconds (empty as soon as none is). A member of a crashed process leaves when its
    session times out; a live one stays."""
    deadline = time.monotonic() + within
    while True:
        present = [m for m in await group_members(kafka, group_id) if match(m)]
        if not present or time.monotonic() >= deadline:
            return present
        await asyncio.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def hold_lock(path: Path) -> IO[bytes] | None:
    """An exclusive lock on ``path`` (created, with its directory), held until the
    returned file is closed or the process ends; None if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+b")  # noqa: SIM115 - the open file IS the lock
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n".encode())
    handle.flush()
    return handle
