"""The configurations of the training stage's two drivers, as plain values.

Built by ``lorastream.stages`` from the settings; the stage never reads the
environment. Both drivers share a :class:`TrainingConfig`, so a replay
trains exactly as the live trainer does; the core (:mod:`trainer.core`)
takes it from here, never the other way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from schemas import Topics
from trainer.general import GeneralSet
from trainer.kafka import KafkaConnection
from trainer.ranges import Bound
from trainer.signing import Verifier

__all__ = ["InstanceId", "ReplayConfig", "TrainerConfig", "TrainingConfig"]


@dataclass(frozen=True)
class LoraSettings:
    """LoRA and AdamW hyper-parameters.

    The learning rate's default, 2e-3, is high for a full model but usual for
    LoRA with one step per 16 examples: a continual trainer takes few steps,
    and lower rates barely moved the loss on the learnable test task.

    ``steps_per_window`` AdamW steps are taken on each window, each over the
    whole window (the design card's one step by default). More learn more from
    each event, at that many times the step's cost: on the learnable task of
    ``bench/bench_learning.py`` three bring the streamed held-out loss near a
    three-epoch offline fine-tune's on the same events.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    # An example is cut to this many tokens (the prompt's start first, see build_batch).
    max_length: int = 2048
    # Padded tokens per micro-batch: 16 x 2,048-token examples go in four micro-batches.
    token_budget: int = 8192
    # Response positions whose logits are computed at once (see trainer.loss).
    loss_chunk_tokens: int = 4096
    gradient_checkpointing: bool = False
    # torch.compile the decoder layers, on a GPU only (the CPU path stays the eager one
    # whose results the determinism tests pin). The first windows of each new length compile.
    compile: bool = False
    steps_per_window: int = 1
    # Other adapters' weights and moments kept on the device, in bytes; None: 1 GiB on a
    # GPU, none on the CPU (where a copy from the CPU is no copy at all).
    resident_bytes: int | None = None
    # Pad each micro-batch to a length bucket (powers of two from 64 up to max_length,
    # trainer.batching.bucket_length): a few shapes for a compiled or captured step. The
    # padding is masked, so the numbers stay those of no buckets within fp32 rounding.
    length_buckets: bool = False

    def __post_init__(self) -> None:
        checks = {
            "r": self.r >= 1,
            "alpha": self.alpha > 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "target_modules": len(self.target_modules) > 0,
            "learning_rate": math.isfinite(self.learning_rate) and self.learning_rate > 0,
            "weight_decay": self.weight_decay >= 0,
            "max_length": self.max_length >= 2,
            "token_budget": self.token_budget >= 1,
            "loss_chunk_tokens": self.loss_chunk_tokens >= 1,
            "steps_per_window": self.steps_per_window >= 1,
            "resident_bytes": self.resident_bytes is None or self.resident_bytes >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"LoraSettings.{name} = {getattr(self, name)!r} is out of range")


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
    # Earlier trained events of the adapter mixed into each step (trainer.rehearsal), from a
    # reservoir of rehearsal_buffer per adapter. 0: off, and windows, files and
    # announcements are exactly those of a trainer without rehearsal.
    rehearsal: int = 0
    rehearsal_buffer: int = 256
    # Held-out events fall in segments of this many versions (unless the producer labels
    # them, metadata.segment): the columns of the forgetting matrix.
    eval_segment_windows: int = 8
    # The general set (LORASTREAM_GENERAL_EVAL) every version is measured on beside the
    # base model; None: off. Read by the stage's configuration, so a bad file stops it first.
    general_eval: GeneralSet | None = None
    # Full windows of up to this many adapters, closed in one batch of records, step in one
    # forward and backward (trainer.grouped) and commit in one transaction. 1: one at a time.
    adapters_per_step: int = 1

    def __post_init__(self) -> None:
        if self.adapters_per_step < 1:
            raise ValueError(
                f"TrainingConfig.adapters_per_step must be at least 1, not {self.adapters_per_step}"
            )
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
        if self.eval_segment_windows < 1:
            raise ValueError(
                "TrainingConfig.eval_segment_windows must be at least 1, "
                f"not {self.eval_segment_windows}"
            )
        if self.rehearsal < 0:
            raise ValueError(f"TrainingConfig.rehearsal must be at least 0, not {self.rehearsal}")
        if self.rehearsal_buffer < 1:
            raise ValueError(
                f"TrainingConfig.rehearsal_buffer must be at least 1, not {self.rehearsal_buffer}"
            )

    @property
    def evaluates(self) -> bool:
        return self.eval_fraction > 0

    @property
    def rehearses(self) -> bool:
        return self.rehearsal > 0


@dataclass(frozen=True)
class InstanceId:
    """How a live trainer names its transactional id, ``prefix + instance``.

    Fencing rests on that id alone (aiokafka's TxnOffsetCommit v0 carries no group
    generation), so two live trainers must never share it: the trainer claims it at start
    (:func:`trainer.claims.claim_instance`), before its producer registers it.
    """

    prefix: str  # "<topic prefix>lorastream-trainer-"
    # LORASTREAM_INSTANCE_ID, or None: "<hostname>-<n>", the lowest n free.
    explicit: str | None
    # Where the per-id locks of this machine are (under the lorastream home).
    lock_dir: Path

    def __post_init__(self) -> None:
        if self.explicit == "":
            raise ValueError("InstanceId.explicit must not be empty (None: claim one)")


@dataclass(frozen=True)
class TrainerConfig:
    """The live trainer: a consumer group on ``learning-events``."""

    kafka: KafkaConnection
    topics: Topics
    group_id: str
    instance: InstanceId
    training: TrainingConfig
    max_wait_seconds: float | None = None
    idle_commit_seconds: float = 5.0
    verifier: Verifier = field(default_factory=Verifier)
    """What the resume trusts of adapter-updates, and the key the committer signs with."""
    # How often an adapter on hold is checked again (its files repaired, its setting back).
    hold_recheck_seconds: float = 30.0
    # The consumer's session: a crashed member stays in the group this long, so a claim
    # waits this long (and a heartbeat more) before calling a member with its id live.
    session_timeout_seconds: float = 10.0


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
