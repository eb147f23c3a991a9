"""Authenticated announcements: who wrote a record, an HMAC that proves it, and what readers trust.

aiokafka's ConsumerRecord does not say whether a record was written inside a
transaction, so ``read_committed`` alone cannot tell the trainer's announcement
from a plain producer's. Every record the committer writes therefore carries two
headers:

``lorastream-writer``
    The committer's transactional id, always (a replay's is
    ``<prefix>lorastream-replay-<target>``, a live trainer's
    ``<prefix>lorastream-trainer-<instance>``).
``lorastream-signature``
    With a key (``LORASTREAM_ANNOUNCE_KEY``): the hex HMAC-SHA256 of the writer, the
    record key and the value (:func:`signature`), so the same record verifies on any topic.

A :class:`Verifier` (the key, if any, and the configured adapter location) is what
every reader passes in. A record it rejects is skipped, logged once per verifier
(one per reader process) with its position and reason, and reported to
``on_reject`` (a metric); it never stops a reader. Without a key, signatures are
not checked, so records written before this existed are still read.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from aiokafka.structs import ConsumerRecord

__all__ = [
    "REASONS",
    "SIGNATURE_HEADER",
    "WRITER_HEADER",
    "Verifier",
    "header",
    "signature",
    "signed_headers",
    "verified",
]

log = logging.getLogger(__name__)

WRITER_HEADER = "lorastream-writer"
SIGNATURE_HEADER = "lorastream-signature"

REASONS = ("unsigned", "signature", "order", "location", "unreadable")
"""Why a record is skipped: no signature (or no writer) where a key is configured; a
signature that does not verify; a version that is not the lineage's next (a gap, or
a repeat with other content); a ``uri`` outside the configured adapter location; a
value that is no AdapterUpdate."""

# Domain separation: an HMAC made for anything else with the same key never verifies here.
_DOMAIN = b"lorastream-announcement-v1"
_NONE = struct.pack(">q", -1)


def _part(data: bytes | None) -> bytes:
    # Length-prefixed, and None (no key, a tombstone) apart from b"": no two different
    # (writer, key, value) triples give the same bytes.
    return _NONE if data is None else struct.pack(">q", len(data)) + data


def signature(key: bytes, writer: str, record_key: bytes | None, value: bytes | None) -> str:
    """The hex HMAC-SHA256 of one record, over its writer, key and value (not its topic)."""
    mac = hmac.new(key, _DOMAIN, hashlib.sha256)
    for part in (writer.encode(), record_key, value):
        mac.update(_part(part))
    return mac.hexdigest()


def signed_headers(
    writer: str, key: bytes | None, record_key: bytes | None, value: bytes | None
) -> list[tuple[str, bytes]]:
    """The headers the committer writes: the writer always, the signature with a key."""
    headers = [(WRITER_HEADER, writer.encode())]
    if key is not None:
        headers.append((SIGNATURE_HEADER, signature(key, writer, record_key, value).encode()))
    return headers


def header(record: ConsumerRecord[bytes, bytes], name: str) -> bytes | None:
    """The (last) value of header ``name`` of ``record``, or None."""
    found = None
    headers: Sequence[tuple[str, bytes]] = record.headers or ()
    for k, v in headers:
        if k == name:
            found = v
    return found


def _within_bucket(uri: str, location: str) -> bool:
    scheme, _, rest = uri.partition("://")
    want_scheme, _, want = location.partition("://")
    if scheme != want_scheme:
        return False
    parts = rest.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return False  # no way to say "up" or to hide an empty segment in an object key
    root = [p for p in want.split("/") if p]
    return len(parts) > len(root) and parts[: len(root)] == root


def _within_dir(uri: str, root: Path) -> bool:
    if "://" in uri or "\x00" in uri:
        return False
    path = PurePosixPath(uri)
    if not path.is_absolute():
        return False  # the trainer announces absolute paths; a relative one names a cwd
    resolved = Path(path).resolve()
    return resolved != root and resolved.is_relative_to(root)


@dataclass(frozen=True)
class Verifier:
    """What a reader trusts: records signed with ``key`` (any, without one) whose ``uri``
    lies under ``location`` (anywhere, without one): an adapter directory, or an object
    store's ``s3://bucket/prefix``.

    ``on_reject(reason)`` hears each rejected record once (a metric's ``inc``).
    """

    key: bytes | None = field(default=None, repr=False)
    location: str | None = None
    on_reject: Callable[[str], None] | None = field(default=None, compare=False, repr=False)
    _reported: set[tuple[str, int, int]] = field(
        default_factory=set, init=False, compare=False, repr=False
    )
    _root: Path | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.location is not None and "://" not in self.location:
            object.__setattr__(self, "_root", Path(self.location).resolve())

    def counting(self, on_reject: Callable[[str], None] | None) -> Verifier:
        """The same trust, reporting to ``on_reject``, with its own once-only log."""
        return Verifier(self.key, self.location, on_reject)

    @property
    def signs(self) -> bool:
        return self.key is not None

    def signature_problem(self, record: ConsumerRecord[bytes, bytes]) -> tuple[str, str] | None:
        """Why ``record``'s signature is not trusted (reason, detail), or None."""
        if self.key is None:
            return None
        writer = header(record, WRITER_HEADER)
        given = header(record, SIGNATURE_HEADER)
        if writer is None or given is None:
            missing = WRITER_HEADER if writer is None else SIGNATURE_HEADER
            return "unsigned", f"no {missing} header, and LORASTREAM_ANNOUNCE_KEY is set"
        try:
            name = writer.decode()
        except UnicodeDecodeError:
            return "signature", "its writer header is not UTF-8"
        expected = signature(self.key, name, record.key, record.value)
        if not hmac.compare_digest(expected.encode(), given):
            return "signature", (
                f"its signature (writer {name!r}) does not verify with LORASTREAM_ANNOUNCE_KEY"
            )
        return None

    def location_problem(self, uri: str) -> tuple[str, str] | None:
        """Why ``uri`` is not a place this reader loads from (reason, detail), or None."""
        if self.location is None:
            return None
        if "://" in self.location:
            inside = _within_bucket(uri, self.location.rstrip("/"))
        else:
            assert self._root is not None
            inside = _within_dir(uri, self._root)
        if inside:
            return None
        where = self._root if self._root is not None else self.location
        return "location", (
            f"its uri {uri!r} is not under the adapter location {where} (LORASTREAM_ADAPTER_DIR)"
        )

    def reject(self, record: ConsumerRecord[bytes, bytes], reason: str, detail: str) -> None:
        """Skip ``record``: one log line and one count per record, however often it is read."""
        position = (record.topic, record.partition, record.offset)
        if position in self._reported:
            return
        self._reported.add(position)
        log.warning(
            "skipping the record at %s[%s]@%s (%s): %s",
            record.topic,
            record.partition,
            record.offset,
            reason,
            detail,
        )
        if self.on_reject is not None:
            self.on_reject(reason)


def verified(record: ConsumerRecord[bytes, bytes], verifier: Verifier | None) -> bool:
    """Whether a record (a snapshot on ``adapter-updates.latest``) may be read: its signature
    verifies (with a key) and the ``uri`` of the announcement it holds is under the
    location. A rejected one is logged once; a reader treats it as unreadable."""
    if verifier is None:
        return True
    problem = verifier.signature_problem(record)
    if problem is None and verifier.location is not None and record.value is not None:
        uri = _snapshot_uri(record.value)
        if uri is not None:
            problem = verifier.location_problem(uri)
    if problem is not None:
        verifier.reject(record, *problem)
        return False
    return True


def _snapshot_uri(value: bytes) -> str | None:
    """The ``uri`` of the announcement a snapshot holds; None when there is none to read
    (decoding the snapshot then says what is wrong with it)."""
    import orjson

    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    update = document.get("update") if isinstance(document, dict) else None
    uri = update.get("uri") if isinstance(update, dict) else None
    return uri if isinstance(uri, str) else None
