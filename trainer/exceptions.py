"""Errors of the training stage."""

from __future__ import annotations

from schemas.errors import LorastreamError

__all__ = [
    "AdapterHeld",
    "AdapterStoreError",
    "BaseModelError",
    "NonFiniteLossError",
    "ReplayError",
    "ResourceError",
    "StepError",
    "TrainerError",
    "VersionExistsError",
]


class TrainerError(LorastreamError):
    """The trainer cannot go on."""


class AdapterStoreError(TrainerError):
    """An adapter version's files are missing or corrupt; the message names the file."""


class VersionExistsError(AdapterStoreError):
    """A version directory (or object prefix) that exists holds other content than the one
    being written: a version is written once, so this writer stops that adapter."""


class AdapterHeld(TrainerError):
    """One adapter cannot train until an operator acts: its newest version's files are
    missing, corrupt or not as announced, or a LoRA setting differs from its lineage's.
    The trainer holds that adapter alone (its windows wait, uncommitted) and goes on."""

    def __init__(self, adapter: str, reason: str) -> None:
        self.adapter = adapter
        self.reason = reason
        super().__init__(f"adapter {adapter} is on hold: {reason}")


class ResourceError(TrainerError):
    """A resource ran out or refused (disk full, read-only, quota, file too large): nothing is
    wrong with the window, so the driver waits and tries again. The message names the path."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        self.errno = errno
        super().__init__(message)


class BaseModelError(TrainerError):
    """The base model directory is missing or cannot be loaded; the message names it."""


class ReplayError(TrainerError):
    """A replay cannot run as asked: an unknown adapter, an empty or lost range, a name taken."""


class StepError(TrainerError):
    """A LoRA step failed."""


class NonFiniteLossError(StepError):
    """The step's loss (or its updated weights) was NaN or infinite."""

    def __init__(self, loss: float, message: str | None = None) -> None:
        self.loss = loss
        super().__init__(message or f"the window's loss is {loss}, not a finite number")
