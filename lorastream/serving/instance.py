"""One serve per inference server: its own consumer group, and a clash refused at start.

Every serve must see every announcement, so each follows ``adapter-updates`` in a group
of its own, named after the server it feeds: ``<prefix>lorastream-serve-<key>``, the key
being ``--name`` when given, else a readable slug of ``--url`` and a short hash of the
normalised URL (``127-0-0-1-8000-3f2a9c1e``). Two serves for two servers are in two
groups, and each loads every version.

Two serves for *one* server would load and unload under each other, so the second is
refused at start (:func:`claim`), by the two checks of :mod:`trainer.claims`: a lock file
under the lorastream home named after the group (another serve on this machine), then the
group's live members (one on another machine). A serve that crashed leaves its member
listed until its session times out, so a member is given that long to leave before it is
called a clash: a restart after a crash waits, then runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
from pathlib import Path
from typing import IO

from yarl import URL

from lorastream.serving.exceptions import ServeClash, ServeUrlError
from trainer.claims import Member, hold_lock, wait_until_gone
from trainer.kafka import KafkaConnection

__all__ = [
    "CLIENT_PREFIX",
    "claim",
    "client_id",
    "group_key",
    "normalise_url",
    "serve_group",
]

log = logging.getLogger(__name__)

CLIENT_PREFIX = "lorastream-serve@"
"""How a serve's follower introduces itself to the broker: ``lorastream-serve@HOST.pidN``."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_url(url: str) -> str:
    """``url`` as ``scheme://host:port/path`` (lower-case scheme and host, the port
    spelt out, no trailing slash), so that two spellings of one server are one key.
    :class:`ServeUrlError` for anything that is not an http(s) URL with a host."""
    problem = f"--url {url!r} is not an inference server's URL"
    try:
        parsed = URL(url.strip())
        port = parsed.port
    except (ValueError, TypeError) as exc:
        raise ServeUrlError(f"{problem}: {exc}; give one like http://gpu:8000.") from exc
    scheme = (parsed.scheme or "").lower()
    if scheme not in _DEFAULT_PORTS:
        said = f"the scheme {scheme!r}" if scheme else "no scheme"
        raise ServeUrlError(f"{problem}: it has {said}, not http or https; e.g. http://gpu:8000.")
    if not parsed.host:
        raise ServeUrlError(f"{problem}: it names no host; e.g. http://gpu:8000.")
    host = parsed.host.lower()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    path = parsed.path.rstrip("/")
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}{path}"


def group_key(url: str, name: str | None = None) -> str:
    """``name`` when given (checked), else a slug of the normalised ``url`` and its hash."""
    if name is not None:
        if not _NAME.match(name):
            raise ServeUrlError(
                f"--name {name!r} is not a serve name: use 1 to 63 letters, digits, '.', '_' "
                "or '-', starting with a letter or digit."
            )
        return name
    normal = normalise_url(url)
    digest = hashlib.sha256(normal.encode()).hexdigest()[:8]
    authority = normal.split("://", 1)[1].split("/", 1)[0]
    slug = re.sub(r"[^a-z0-9]+", "-", authority.lower()).strip("-")[:40]
    return f"{slug}-{digest}"


def serve_group(prefix: str, url: str, name: str | None = None) -> str:
    """The consumer group of the serve that feeds the server at ``url`` (or ``name``)."""
    return f"{prefix}lorastream-serve-{group_key(url, name)}"


def client_id() -> str:
    """This process's follower's client id, which says where it runs."""
    return f"{CLIENT_PREFIX}{socket.gethostname()}.pid{os.getpid()}"


def _is_serve(member: Member) -> bool:
    return member.client_id.startswith(CLIENT_PREFIX)


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


async def claim(
    kafka: KafkaConnection,
    group_id: str,
    what: str,
    lock_dir: Path | None,
    within: float,
) -> IO[bytes] | None:
    """Make sure no other serve feeds the server ``what`` names (its URL or name): the
    lock ``lock_dir/<group_id>.lock`` (returned, held while the caller runs; None without
    a ``lock_dir``), then the live members of ``group_id``, given ``within`` seconds to
    leave. :class:`ServeClash` names where the other one runs."""
    lock: IO[bytes] | None = None
    if lock_dir is not None:
        path = lock_dir / f"{group_id}.lock"
        lock = hold_lock(path)
        if lock is None:
            raise ServeClash(
                f"another lorastream serve already serves {what} on this machine "
                f"({_lock_holder(path)}, lock {path}); two would load and unload under "
                "each other. Stop it first, or point this one at another server."
            )
    try:
        present = await wait_until_gone(kafka, group_id, _is_serve, 0)
        if present:
            log.warning(
                "consumer group %s still lists %s: waiting up to %gs for it to leave "
                "(a serve that crashed leaves when its session times out)",
                group_id,
                ", ".join(map(str, present)),
                within,
            )
            present = await wait_until_gone(kafka, group_id, _is_serve, within)
        if present:
            raise ServeClash(
                f"another lorastream serve already serves {what}: "
                f"{', '.join(map(str, present))} (consumer group {group_id}); two would load "
                "and unload under each other. Stop it first, or point this one at another "
                "server."
            )
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return lock
