"""The general set: text that is no adapter's task, to see an adapter drift away from the base.

An adapter can learn its tenant's task while getting worse at everything else;
its own held-out events cannot show that. ``LORASTREAM_GENERAL_EVAL`` names a
JSONL file of ``{"prompt", "response"}`` objects, the same for every adapter,
and every version is measured on it beside the base model
(:class:`~schemas.GeneralEvalSpec`). The file's sha256 goes with the numbers,
so a reader knows which set two versions were compared on.

The set is read once, when the stage's configuration is built, so a bad file
stops the trainer at start with the line that is wrong, not at its first
version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import orjson

from trainer.exceptions import TrainerError

__all__ = ["GeneralSet", "GeneralSetError", "read_general_set"]


class GeneralSetError(TrainerError):
    """The general set's file is missing, unreadable or not JSONL of prompt/response pairs;
    the message names the file, and the line for a bad one."""


@dataclass(frozen=True)
class GeneralSet:
    """The general set's examples, in file order, and the sha256 of the file's bytes."""

    examples: tuple[tuple[str, str], ...]
    sha256: str
    path: str

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError(f"GeneralSet {self.path} has no examples")


def read_general_set(path: Path) -> GeneralSet:
    """The set in ``path``: one ``{"prompt": str, "response": str}`` object per line (other
    keys ignored, blank lines skipped)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise GeneralSetError(f"{path}: no such file") from exc
    except OSError as exc:
        raise GeneralSetError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    examples = []
    for number, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            examples.append(_example(line, f"{path}:{number}"))
    if not examples:
        raise GeneralSetError(f"{path}: holds no examples; one JSON object per line")
    return GeneralSet(tuple(examples), hashlib.sha256(data).hexdigest(), str(path))


def _example(line: bytes, where: str) -> tuple[str, str]:
    try:
        fields = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise GeneralSetError(f"{where}: not JSON: {exc}") from exc
    if not isinstance(fields, dict):
        raise GeneralSetError(f'{where}: not a JSON object with "prompt" and "response"')
    for key in ("prompt", "response"):
        if not isinstance(fields.get(key), str):
            raise GeneralSetError(f'{where}: "{key}" must be a string')
    if not fields["response"]:
        raise GeneralSetError(f'{where}: "response" is empty; there is nothing to measure')
    return fields["prompt"], fields["response"]
