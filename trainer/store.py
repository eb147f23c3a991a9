"""Adapter versions on disk: ``<root>/<adapter>/v<version>/``, written atomically and durably.

Each version directory holds what PEFT and vLLM load as it is
(``adapter_model.safetensors``, ``adapter_config.json``), the optimizer state
(``optimizer.safetensors``), ``lorastream.json`` (metadata), when evaluation
is on ``eval-set.jsonl`` (the adapter's evaluation set), when rehearsal is on
``rehearsal.jsonl`` (its rehearsal buffer, :mod:`trainer.rehearsal`), and last
``manifest.json`` (:mod:`trainer.manifest`: every other file's sha256; the
announcement carries the manifest's own). Everything is written into a hidden
temporary directory beside the target, fsynced, and renamed into place; the
parent is fsynced after. Safetensors and JSON only: nothing is ever pickled.

**A version is written once.** The rename refuses a directory that exists: a
window trained again after a crash, with the same files (the CPU is
deterministic), finds its version already there and keeps it; other content
there is a :class:`~trainer.exceptions.VersionExistsError` naming both, and
the adapter is held. Reading verifies every file against the announcement
before anything is trusted, and names the file that is missing or wrong.

The root may also be an object store's URL (``s3://bucket/prefix``): a version
is then written as above into a local cache, uploaded with its manifest last
(:mod:`trainer.objects`), and announced by its URL; reading fetches it into the
cache first. Trainers on other machines, with other caches, resume from it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from schemas.limits import sha256_file
from trainer import manifest
from trainer.exceptions import AdapterStoreError, ResourceError, VersionExistsError
from trainer.lora import AdapterState
from trainer.manifest import MANIFEST_FILE
from trainer.objects import fetch_version, is_remote, local_path_of, upload_version

if TYPE_CHECKING:
    from trainer.lora import LoraStepper

__all__ = [
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "EVAL_SET_FILE",
    "MANIFEST_FILE",
    "METADATA_FILE",
    "OPTIMIZER_FILE",
    "REHEARSAL_FILE",
    "AdapterStore",
    "StoredVersion",
    "resource_errno",
    "sha256_file",
]

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
METADATA_FILE = "lorastream.json"
EVAL_SET_FILE = "eval-set.jsonl"
REHEARSAL_FILE = "rehearsal.jsonl"


# Errors of the machine, not of the window: waiting (and freeing space) fixes them.
RESOURCE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.ENOMEM, errno.EIO, errno.EMFILE}
)
# safetensors writes from Rust and reports an OS error as text: "... (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def resource_errno(exc: BaseException) -> int | None:
    """The errno of ``exc`` when it says a resource ran out or refused, else None."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        found = _RUST_OS_ERROR.search(str(exc))
        code = int(found.group(1)) if found else None
    return code if code in RESOURCE_ERRNOS else None


@dataclass(frozen=True)
class StoredVersion:
    adapter: str
    version: int
    path: Path  # the local directory (the cache's, for an object store)
    sha256: str  # of the weights
    uri: str  # what the announcement says: the absolute directory, or the object store's URL
    manifest_sha256: str  # of manifest.json, which covers every file


def current_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only set it, and
    setting it, even back, races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(directory: Path) -> None:
    """Give the files in ``directory`` the modes the umask asks for. safetensors writes
    0600 whatever the umask, so a server running as another user (a vLLM container)
    could not read an adapter."""
    mask = current_umask()
    for entry in directory.iterdir():
        if entry.is_file():
            os.chmod(entry, 0o666 & ~mask)
    os.chmod(directory, 0o777 & ~mask)


def _fsync_tree(directory: Path) -> None:
    for entry in directory.rglob("*"):
        if entry.is_file():
            fd = os.open(entry, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    """The adapter versions under one root: a directory, or an object store's URL with a
    local ``cache`` directory."""

    def __init__(
        self,
        root: Path | str,
        before_write: Callable[[Path], None] | None = None,
        cache: Path | None = None,
    ) -> None:
        self.url: str | None = None
        if is_remote(root):
            if cache is None:
                raise AdapterStoreError(f"adapters at {root} need a local cache directory")
            self.url = str(root).rstrip("/")
            self.cache = cache
            self.root = local_path_of(self.url, cache)
        else:
            self.root = Path(root)
        self._before_write = before_write  # the fault hooks' way in (trainer.faults)

    def version_dir(self, adapter: str, version: int) -> Path:
        return self.root / adapter / f"v{version}"

    def uri_of(self, adapter: str, version: int) -> str:
        if self.url is not None:
            return f"{self.url}/{adapter}/v{version}"
        return str(self.version_dir(adapter, version).resolve())

    def _fetch(self, adapter: str, version: int) -> None:
        """For an object store: the version into the cache (it must have its manifest)."""
        if self.url is not None:
            fetch_version(self.uri_of(adapter, version), self.cache)

    def write(
        self,
        adapter: str,
        version: int,
        state: AdapterState,
        stepper: LoraStepper,
        metadata: Mapping[str, Any],
        extra_files: Mapping[str, bytes] | None = None,
    ) -> StoredVersion:
        """Write one version, once; ``extra_files`` (name → bytes) go beside the others, as
        durably. A version that exists already is kept if its files are these (a window
        repeated after a crash), else a VersionExistsError names both."""
        final = self.version_dir(adapter, version)
        parent = final.parent
        staging = parent / f".v{version}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            if self._before_write is not None:
                self._before_write(parent)
            parent.mkdir(parents=True, exist_ok=True)
            for stale in parent.glob(f".v{version}.tmp-*"):  # left by a crash in an earlier try
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir()
            stepper.save_peft(state, staging)
            save_file(
                {k: t.contiguous() for k, t in state.optimizer.items()},
                str(staging / OPTIMIZER_FILE),
                metadata={"steps": str(state.steps)},
            )
            for name, data in (extra_files or {}).items():
                (staging / name).write_bytes(data)
            digest = sha256_file(staging / ADAPTER_FILE)
            document = {
                **metadata,
                "sha256": digest,
                "files": sorted(p.name for p in staging.iterdir()),
            }
            (staging / METADATA_FILE).write_bytes(
                orjson.dumps(document, option=orjson.OPT_INDENT_2)
            )
            listing = manifest.build(staging)
            (staging / MANIFEST_FILE).write_bytes(listing)
            _honour_umask(staging)
            _fsync_tree(staging)
            self._place(staging, final, f"adapter {adapter} v{version}")
            _fsync_dir(parent)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            code = resource_errno(exc)
            if code is not None:
                raise ResourceError(
                    f"cannot write adapter {adapter} v{version} under {parent}: "
                    f"{os.strerror(code)} ({errno.errorcode.get(code, code)})",
                    code,
                ) from exc
            raise
        uri = self.uri_of(adapter, version)
        if self.url is not None:
            upload_version(final, uri)  # the manifest last: only then does the version exist
        return StoredVersion(adapter, version, final, digest, uri, manifest.digest_of(listing))

    @staticmethod
    def _place(staging: Path, final: Path, what: str) -> None:
        """Rename ``staging`` to ``final`` unless ``final`` exists: then it stays as it is,
        and ``staging`` must hold the same files (else VersionExistsError)."""
        try:
            os.rename(staging, final)  # refuses a non-empty directory: never a replacement
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
        ours = (staging / MANIFEST_FILE).read_bytes()
        try:
            theirs: bytes | None = (final / MANIFEST_FILE).read_bytes()
        except OSError:
            theirs = None
        if theirs != ours:
            described = (
                f"manifest sha256 {manifest.digest_of(theirs)}"
                if theirs is not None
                else "no manifest"
            )
            raise VersionExistsError(
                f"{what} already exists at {final} with other content ({described}; this "
                f"window's is {manifest.digest_of(ours)}); a version is written once, so the "
                "adapter stops here. Another writer owns this name, or a crash left a version "
                "that was never announced: see `lorastream adapters repair`"
            )
        shutil.rmtree(staging, ignore_errors=True)  # the same version, written before

    def _file(self, adapter: str, version: int, name: str) -> Path:
        directory = self.version_dir(adapter, version)
        path = directory / name
        if not directory.is_dir():
            raise AdapterStoreError(
                f"adapter {adapter} v{version}: directory {directory} is missing"
            )
        if not path.is_file():
            raise AdapterStoreError(f"adapter {adapter} v{version}: file {path} is missing")
        return path

    def verify(
        self,
        adapter: str,
        version: int,
        manifest_sha256: str | None,
        weights_sha256: str | None = None,
    ) -> Path:
        """The version's local directory, every file checked against the announcement
        (:func:`trainer.manifest.verify`); an AdapterStoreError names the file at fault."""
        self._fetch(adapter, version)
        directory = self.version_dir(adapter, version)
        manifest.verify(directory, f"adapter {adapter} v{version}", manifest_sha256, weights_sha256)
        return directory

    def read(
        self,
        adapter: str,
        version: int,
        expected_sha256: str | None = None,
        manifest_sha256: str | None = None,
    ) -> AdapterState:
        """Load a version's weights and optimizer state, every file checked first against
        the announced manifest (or, for an older announcement, the weights' sha256)."""
        if expected_sha256 is not None or manifest_sha256 is not None:
            self.verify(adapter, version, manifest_sha256, expected_sha256)
        else:
            self._fetch(adapter, version)
        weights_path = self._file(adapter, version, ADAPTER_FILE)
        optimizer_path = self._file(adapter, version, OPTIMIZER_FILE)
        try:
            weights = load_file(str(weights_path))
            optimizer = load_file(str(optimizer_path))
            with safe_open(str(optimizer_path), framework="pt") as handle:
                steps = int((handle.metadata() or {}).get("steps", "0"))
        except Exception as exc:
            raise AdapterStoreError(
                f"adapter {adapter} v{version}: cannot read {weights_path} or {optimizer_path}: {exc}"
            ) from exc
        return AdapterState(weights=weights, optimizer=optimizer, steps=steps)

    def read_optional(self, adapter: str, version: int, name: str) -> bytes | None:
        """A version's file ``name``, or None if the version was written without it."""
        self._fetch(adapter, version)
        directory = self.version_dir(adapter, version)
        if not directory.is_dir():
            raise AdapterStoreError(
                f"adapter {adapter} v{version}: directory {directory} is missing"
            )
        path = directory / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AdapterStoreError(
                f"adapter {adapter} v{version}: cannot read {path}: {exc}"
            ) from exc
