"""A version's manifest: every file of the version, its size and sha256.

Every version directory (and every version on an object store) holds
``manifest.json``, written last, listing each other file the version has:
the weights, their config, the optimizer state, ``lorastream.json`` and the
evaluation set. Its own sha256 goes into the AdapterUpdate
(``manifest_sha256``), so the announcement covers every byte that anything
reads back. The document is canonical (sorted keys, no whitespace that could
vary), so the same files always give the same digest: a version trained
again from the same events on the CPU has the same manifest, bit for bit.

:func:`verify` is what every loader calls before it trusts a version.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson

from schemas.limits import sha256_file
from trainer.exceptions import AdapterStoreError

__all__ = ["MANIFEST_FILE", "Manifest", "build", "digest_of", "parse", "verify"]

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "adapter_model.safetensors"

Manifest = dict[str, dict[str, Any]]
"""File name → ``{"sha256": hex, "size": bytes}``."""


def build(directory: Path) -> bytes:
    """The manifest document of the files in ``directory`` (the manifest itself excepted)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    entries = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in files}
    return orjson.dumps({"files": entries}, option=orjson.OPT_SORT_KEYS)


def digest_of(document: bytes) -> str:
    return hashlib.sha256(document).hexdigest()


def parse(document: bytes, where: str) -> Manifest:
    """The entries of a manifest document; an AdapterStoreError naming ``where`` if it is none."""
    try:
        files: Manifest = orjson.loads(document)["files"]
        for name, entry in files.items():
            if "/" in name or name in (".", "..", MANIFEST_FILE):
                raise ValueError(f"bad file name {name!r}")
            if not isinstance(entry.get("sha256"), str):
                raise ValueError(f"no sha256 for {name!r}")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AdapterStoreError(f"{where} is not a manifest: {exc}") from exc
    return files


def verify(
    directory: Path,
    what: str,
    manifest_sha256: str | None,
    weights_sha256: str | None = None,
) -> None:
    """Check the version in ``directory`` against its announcement, or raise an
    AdapterStoreError that names ``what`` (e.g. "adapter tutor v3") and the file at fault.

    With ``manifest_sha256`` (announcements since manifests exist): the manifest has that
    digest, every file it lists is there with its sha256, and no other file is. Without it
    (older announcements), only the weights are covered, by ``weights_sha256``.
    """
    if not directory.is_dir():
        raise AdapterStoreError(f"{what}: directory {directory} is missing")
    if manifest_sha256 is not None:
        path = directory / MANIFEST_FILE
        try:
            document = path.read_bytes()
        except FileNotFoundError:
            raise AdapterStoreError(f"{what}: {path} is missing") from None
        except OSError as exc:
            raise AdapterStoreError(f"{what}: cannot read {path}: {exc}") from exc
        actual = digest_of(document)
        if actual != manifest_sha256:
            raise AdapterStoreError(
                f"{what}: sha256 of {path} is {actual}, but the announcement says "
                f"{manifest_sha256}; the manifest was changed or is corrupt"
            )
        files = parse(document, str(path))
        for name, entry in sorted(files.items()):
            _check_file(directory / name, entry["sha256"], what, "its manifest")
        extra = sorted(
            p.name for p in directory.iterdir() if p.name != MANIFEST_FILE and p.name not in files
        )
        if extra:
            raise AdapterStoreError(
                f"{what}: {directory} holds {', '.join(extra)}, which its manifest does not list"
            )
    if weights_sha256 is not None:
        _check_file(directory / WEIGHTS_FILE, weights_sha256, what, "the announcement")


def _check_file(path: Path, expected: str, what: str, says: str) -> None:
    try:
        actual = sha256_file(path)
    except FileNotFoundError:
        raise AdapterStoreError(f"{what}: file {path} is missing") from None
    except OSError as exc:
        raise AdapterStoreError(f"{what}: cannot read {path}: {exc}") from exc
    if actual != expected:
        raise AdapterStoreError(
            f"{what}: sha256 of {path} is {actual}, but {says} says {expected}; the file was "
            "changed or is corrupt"
        )
