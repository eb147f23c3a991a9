"""Adapter versions on an object store (``s3://bucket/prefix``), with a local cache.

A version is uploaded file by file under ``<prefix>/<adapter>/v<version>/`` and
then ``manifest.json`` (:mod:`trainer.manifest`), last: each file's name, size
and sha256. **A version without its manifest does not exist**: a trainer
killed mid-upload leaves files that nothing reads, and its window is trained
and uploaded again. **A manifest is never overwritten**: the upload first
looks for one (a version that exists keeps its files: the same manifest is
the same version, another is a VersionExistsError), and the manifest itself
is put with ``If-None-Match: *`` (obstore's ``mode="create"``), so of two
writers racing for a version only one makes it. Reading a
version fetches its manifest, then any file the local cache lacks or holds
with another sha256, into a staging directory renamed into place, so a reader
never sees half a version; every file is checked against the manifest.

The store is opened through obstore from the URL and the usual AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``AWS_ENDPOINT_URL`` for an S3-compatible server, ``AWS_ALLOW_HTTP=true`` for
one without TLS). An error of the store itself (unreachable, refused, 5xx) is
a :class:`~trainer.exceptions.ResourceError`: nothing is wrong with the window,
and the trainer waits and tries again, as for a full disk.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.limits import sha256_file
from trainer import manifest
from trainer.exceptions import AdapterStoreError, ResourceError, VersionExistsError
from trainer.manifest import MANIFEST_FILE

if TYPE_CHECKING:
    from obstore.store import RetryConfig

__all__ = [
    "MANIFEST_FILE",
    "fetch_version",
    "is_remote",
    "local_path_of",
    "restore_version",
    "upload_version",
]

_SCHEMES = ("s3://",)
# Retries inside one request; the trainer's own wait-and-retry covers longer outages.
_RETRY_TRIES, _RETRY_SECONDS = 3, 20.0


def is_remote(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(_SCHEMES)


def local_path_of(uri: str, cache: Path) -> Path:
    """Where the cache keeps the version at ``uri``: ``<cache>/<bucket>/<key>``."""
    scheme, _, rest = uri.partition("://")
    parts = [p for p in rest.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise AdapterStoreError(f"{uri} is not a version's URL ({scheme}://bucket/prefix/…)")
    return cache.joinpath(*parts)


def _open(url: str) -> Any:
    from obstore.store import from_url

    retry: RetryConfig = {
        "max_retries": _RETRY_TRIES,
        "retry_timeout": timedelta(seconds=_RETRY_SECONDS),
    }
    try:
        return from_url(url, retry_config=retry)
    except Exception as exc:  # a malformed URL or configuration
        raise AdapterStoreError(f"cannot open the object store at {url}: {exc}") from exc


@contextmanager
def _store_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except (AdapterStoreError, ResourceError, FileNotFoundError):
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResourceError(f"{doing}: {first}", errno.EIO) from exc


def _get(store: Any, key: str) -> bytes | None:
    import obstore

    try:
        return bytes(obstore.get(store, key).bytes())
    except FileNotFoundError:
        return None


def upload_version(directory: Path, url: str) -> None:
    """Upload the files of ``directory`` under ``url``, then its manifest, unless the
    version is there already (the same manifest: nothing to do; another: refused)."""
    import obstore
    from obstore.exceptions import AlreadyExistsError

    listing = directory / MANIFEST_FILE
    ours = listing.read_bytes() if listing.is_file() else manifest.build(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    store = _open(url)
    with _store_errors(f"cannot upload {directory} to {url}"):
        if _settled(_get(store, MANIFEST_FILE), ours, url):
            return
        for path in files:
            obstore.put(store, path.name, path.read_bytes())
        try:
            obstore.put(store, MANIFEST_FILE, ours, mode="create")
        except AlreadyExistsError:  # another writer's manifest landed since we looked
            _settled(_get(store, MANIFEST_FILE), ours, url)


def restore_version(directory: Path, url: str) -> None:
    """Put back a version whose files on the store are not as announced: every file of
    ``directory`` (already checked to be the announced version), the manifest last. Only
    ``lorastream adapters repair`` calls it; the manifest it writes is the announced one."""
    import obstore

    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    store = _open(url)
    with _store_errors(f"cannot restore {url} from {directory}"):
        for path in files:
            obstore.put(store, path.name, path.read_bytes())
        obstore.put(store, MANIFEST_FILE, (directory / MANIFEST_FILE).read_bytes())


def _settled(theirs: bytes | None, ours: bytes, url: str) -> bool:
    """Whether the version at ``url`` exists already with manifest ``ours``; a different
    manifest there is a VersionExistsError (a version is written once)."""
    if theirs is None:
        return False
    if theirs != ours:
        raise VersionExistsError(
            f"{url} already exists with other content (manifest sha256 "
            f"{manifest.digest_of(theirs)}; this window's is {manifest.digest_of(ours)}); a "
            "version is written once, so the adapter stops here: see `lorastream adapters repair`"
        )
    return True


def _read_manifest(store: Any, uri: str) -> tuple[bytes, manifest.Manifest]:
    data = _get(store, MANIFEST_FILE)
    if data is None:
        raise AdapterStoreError(
            f"{uri}/{MANIFEST_FILE} is missing: that version's upload never finished (a version "
            "without its manifest does not exist)"
        )
    return data, manifest.parse(data, f"{uri}/{MANIFEST_FILE}")


def _matches(directory: Path, document: bytes, files: manifest.Manifest) -> bool:
    listing = directory / MANIFEST_FILE
    return (
        directory.is_dir()
        and listing.is_file()
        and listing.read_bytes() == document
        and all(
            (directory / name).is_file() and sha256_file(directory / name) == entry["sha256"]
            for name, entry in files.items()
        )
    )


def fetch_version(uri: str, cache: Path) -> Path:
    """The version at ``uri`` in the local cache, fetched if missing or different, every
    file checked against the manifest; its local directory."""
    target = local_path_of(uri, cache)
    store = _open(uri)
    with _store_errors(f"cannot read {uri}"):
        document, files = _read_manifest(store, uri)
        if _matches(target, document, files):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.fetch-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            for name, entry in files.items():
                data = _get(store, name)
                if data is None:
                    raise AdapterStoreError(
                        f"{uri}/{name} is missing, though the manifest lists it"
                    )
                (staging / name).write_bytes(data)
                actual = sha256_file(staging / name)
                if actual != entry["sha256"]:
                    raise AdapterStoreError(
                        f"{uri}/{name} has sha256 {actual}, its manifest says {entry['sha256']}: "
                        "changed or corrupt"
                    )
            (staging / MANIFEST_FILE).write_bytes(document)
            if target.exists():
                aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(target, aside)
                os.rename(staging, target)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
