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

:func:`claim_instance` puts the two together for the trainer: the transactional id it
takes, explicit or the first free ``<hostname>-<n>``, and the lock it holds for its life.

aiokafka's ``describe_consumer_groups`` cannot read a Kafka 4 broker's answer (its v3
request is paired with the v2 response layout), so :class:`_DescribeGroups` asks in v2.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.admin import DescribeGroupsRequest, DescribeGroupsRequest_v2

from trainer.config import InstanceId
from trainer.exceptions import TrainerError
from trainer.kafka import KafkaConnection, admin_client, kafka_errors, send_to_node

# Seconds a group question waits for the cluster to have a coordinator for the group.
COORDINATOR_WAIT = 30.0

__all__ = [
    "Claim",
    "InstanceClash",
    "Member",
    "claim_instance",
    "group_members",
    "hold_lock",
    "still_unclaimed",
    "wait_until_gone",
]

log = logging.getLogger(__name__)

# More than this many trainers on one machine is a mistake, not a plan: say so.
MAX_AUTO_INSTANCES = 64


class InstanceClash(TrainerError):
    """Another live trainer holds the transactional id this one was told to take."""


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


async def group_members(
    kafka: KafkaConnection, group_id: str, within: float = COORDINATOR_WAIT
) -> list[Member]:
    """The members of ``group_id`` now; empty for a group nobody has joined (or that is
    rebalancing with no one left).

    A retriable refusal (no coordinator yet: a fresh cluster creates ``__consumer_offsets``
    on the first group's first question, and a coordinator moves when its broker does) is
    asked again, for up to ``within`` seconds."""
    doing = f"describing consumer group {group_id}"
    deadline = time.monotonic() + within
    delay = 0.2
    async with admin_client(kafka, doing) as admin:
        while True:
            try:
                node = await admin.find_coordinator(group_id)
                response = await send_to_node(admin, node, _DescribeGroups([group_id]))
                groups = response.to_object()["groups"]
                for group in groups:
                    if group["error_code"]:
                        raise for_code(group["error_code"])(f"describing {group_id}")
                break
            except KafkaError as exc:
                if not exc.retriable or time.monotonic() + delay > deadline:
                    with kafka_errors(kafka.servers, doing):
                        raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
    members: list[Member] = []
    for group in groups:
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


@dataclass
class Claim:
    """A transactional id this process holds, and the lock that says so on this machine."""

    transactional_id: str
    lock: IO[bytes]

    def release(self) -> None:
        self.lock.close()


def lock_path(lock_dir: Path, transactional_id: str) -> Path:
    return lock_dir / f"{transactional_id}.lock"


async def claim_instance(
    kafka: KafkaConnection, group_id: str, instance: InstanceId, session_timeout: float
) -> Claim:
    """Take the transactional id ``instance`` names, before any producer registers it.

    An explicit id is taken or refused (:class:`InstanceClash`): refused when a process
    on this machine holds its lock, or when a member of ``group_id`` with it as client_id
    is still there ``session_timeout`` seconds on (a crashed one has left by then). With
    none, the instance is ``<hostname>-<n>`` with the lowest n that passes the same checks,
    so a restart after a crash gets its id back and fences its own dead predecessor, as a
    restart always has, while a live trainer is never fenced.
    """
    prefix, explicit = instance.prefix, instance.explicit
    if explicit is not None:
        claim = await _try(kafka, group_id, prefix + explicit, instance.lock_dir, session_timeout)
        if not isinstance(claim, Claim):
            raise InstanceClash(
                f"transactional id {prefix + explicit} (LORASTREAM_INSTANCE_ID={explicit}) "
                f"is held by a live trainer {claim}; give each trainer its own "
                "LORASTREAM_INSTANCE_ID, or leave it unset to take a free one"
            )
        log.info("trainer id %s taken (LORASTREAM_INSTANCE_ID)", claim.transactional_id)
        return claim
    host = _hostname()
    for n in range(MAX_AUTO_INSTANCES):
        candidate = f"{prefix}{host}-{n}"
        claim = await _try(kafka, group_id, candidate, instance.lock_dir, session_timeout)
        if isinstance(claim, Claim):
            log.info(
                "trainer id %s taken (LORASTREAM_INSTANCE_ID unset: the first free of %s)",
                candidate,
                host,
            )
            return claim
        log.info("trainer id %s is held by a live trainer %s; trying the next", candidate, claim)
    raise InstanceClash(
        f"the first {MAX_AUTO_INSTANCES} trainer ids of {host} ({prefix}{host}-N) are all "
        "held by live trainers; set LORASTREAM_INSTANCE_ID"
    )


async def still_unclaimed(kafka: KafkaConnection, group_id: str, transactional_id: str) -> None:
    """Raise :class:`InstanceClash` if a member of ``group_id`` has ``transactional_id``
    now: checked again after a slow step between the claim and the producer's start."""
    clash = [m for m in await group_members(kafka, group_id) if m.client_id == transactional_id]
    if clash:
        raise InstanceClash(
            f"transactional id {transactional_id} was taken meanwhile by a trainer in group "
            f"{group_id} as {', '.join(map(str, clash))}; give each trainer its own "
            "LORASTREAM_INSTANCE_ID, or leave it unset"
        )


async def _try(
    kafka: KafkaConnection,
    group_id: str,
    transactional_id: str,
    lock_dir: Path,
    session_timeout: float,
) -> Claim | str:
    """The claim of ``transactional_id``, or where the live trainer that holds it runs."""
    path = lock_path(lock_dir, transactional_id)
    lock = hold_lock(path)
    if lock is None:
        return f"on this machine (pid {_holder(path)}, lock {path})"
    try:
        # The lock is ours, so no trainer with this id lives on this machine (under this
        # home); a member that has it is elsewhere, or a crashed one waiting to time out.
        ours = lambda m: m.client_id == transactional_id  # noqa: E731
        if any(ours(m) for m in await group_members(kafka, group_id)):
            log.info(
                "%s is in group %s: waiting up to %.0f s for it to leave (a crashed "
                "trainer's membership lasts until its session times out)",
                transactional_id,
                group_id,
                session_timeout,
            )
            left = await wait_until_gone(kafka, group_id, ours, session_timeout)
        else:
            left = []
    except BaseException:
        lock.close()
        raise
    if left:
        lock.close()
        return "in group " + group_id + " as " + ", ".join(str(m) for m in left)
    return Claim(transactional_id, lock)


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _hostname() -> str:
    """This machine's name, cut to what an instance id may hold (``[A-Za-z0-9._-]``)."""
    name = socket.gethostname().split(".")[0] or "host"
    allowed = string.ascii_letters + string.digits + "-_"
    cleaned = "".join(c if c in allowed else "-" for c in name)
    return cleaned[:48] or "host"
