"""The configurations of the training stage's two drivers, as plain values.

Built by ``lorastream.stages`` from the settings; the stage never reads the
environment. Both drivers share a :class:`TrainingConfig`, so a replay
trains exactly as the live trainer does; the core (:mod:`trainer.core`)
takes it from here, never the other way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from schemas import Topics
from trainer.kafka import KafkaConnection
from trainer.lora import LoraSettings
from trainer.ranges import Bound
from trainer.signing import Verifier

__all__ = ["ReplayConfig", "TrainerConfig", "TrainingConfig"]


@dataclass(frozen=True)
class TrainingConfig:
    """What training a window needs, whichever driver runs it."""

    adapter_dir: Path | str  # a directory, or an object store's URL (s3://bucket/prefix)
    base_model: Path
    base_model_name: str
    window_size: int = 16
    max_tries: int = 3
    seed: int = 0
    device: str = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)
    faults: str | None = None
    # Off unless asked for (the settings ask for 0.1): with 0, windows, files and
    # announcements are exactly those of a trainer without evaluation.
    eval_fraction: float = 0.0
    eval_size: int = 256
    # Where versions on an object store are kept locally (written, and fetched to resume).
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise ValueError(
                f"TrainingConfig.window_size must be at least 1, not {self.window_size}"
            )
        if self.max_tries < 1:
            raise ValueError(f"TrainingConfig.max_tries must be at least 1, not {self.max_tries}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(
                f"TrainingConfig.eval_fraction must be in [0, 1), not {self.eval_fraction}"
            )
        if self.eval_size < 1:
            raise ValueError(f"TrainingConfig.eval_size must be at least 1, not {self.eval_size}")

    @property
    def evaluates(self) -> bool:
        return self.eval_fraction > 0


@dataclass(frozen=True)
class TrainerConfig:
    """The live trainer: a consumer group on ``learning-events``."""

    kafka: KafkaConnection
    topics: Topics
    group_id: str
    transactional_id: str
    training: TrainingConfig
    max_wait_seconds: float | None = None
    idle_commit_seconds: float = 5.0
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

    kafka: KafkaConnection
    topics: Topics
    topic: str
    source: str | None
    target: str | None
    transactional_id: str
    training: TrainingConfig
    start: Bound | None = None
    end: Bound | None = None
    resume: bool = False
    verifier: Verifier = field(default_factory=Verifier)
    """What the replay trusts of adapter-updates, and the key its committer signs with."""
