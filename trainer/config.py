"""The configurations of the training stage's two drivers, as plain values.

Built by ``lorastream.stages`` from the settings; the stage never reads the
environment. Both drivers share a :class:`~trainer.core.TrainingConfig`, so a
replay trains exactly as the live trainer does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas import Topics
from trainer.core import TrainingConfig
from trainer.history import Bound
from trainer.signing import Verifier

__all__ = ["ReplayConfig", "TrainerConfig"]


@dataclass(frozen=True)
class TrainerConfig:
    """The live trainer: a consumer group on ``learning-events``."""

    bootstrap_servers: str
    topics: Topics
    group_id: str
    transactional_id: str
    training: TrainingConfig
    max_wait_seconds: float | None = None
    idle_commit_seconds: float = 5.0
    client_options: dict[str, Any] = field(default_factory=dict)
    verifier: Verifier = field(default_factory=Verifier)
    """What the resume trusts of adapter-updates, and the key the committer signs with."""
    # How often an adapter on hold is checked again (its files repaired, its setting back).
    hold_recheck_seconds: float = 30.0


@dataclass(frozen=True)
class ReplayConfig:
    """A replay job: ``source``'s events in ``[start, end]`` of ``topic`` into lineage ``target``.

    ``topic`` is ``learning-events``, or ``generation-results`` when the
    driver re-scores (its decoder then applies the scoring rule).
    """

    bootstrap_servers: str
    topics: Topics
    topic: str
    source: str | None
    target: str | None
    transactional_id: str
    training: TrainingConfig
    start: Bound | None = None
    end: Bound | None = None
    resume: bool = False
    client_options: dict[str, Any] = field(default_factory=dict)
    verifier: Verifier = field(default_factory=Verifier)
    """What the replay trusts of adapter-updates, and the key its committer signs with."""
