"""The training stage: windows of learning events → LoRA steps → announced adapter versions.

One core, two drivers. :class:`WindowTrainer` (``trainer.core``) trains one
window into one lineage with no Kafka in it: step, retries, durable files,
the AdapterUpdate or the quarantine record. :class:`Trainer`
(``trainer.consumer``) is the live consumer-group loop; :class:`Replay`
(``trainer.replay``) retrains a lineage from a range of the log. Both commit
through one :class:`Committer` (``trainer.committer``) and group events with
one rule (``trainer.window``). ``trainer.lora`` is the step, ``trainer.model``
the base model, ``trainer.store`` the adapter files, ``trainer.lineage`` and
``trainer.history`` the history read back from Kafka. The stage takes its
configuration as arguments and never reads the environment.
"""

from trainer.committer import CommitState, Committer, Outgoing
from trainer.config import ReplayConfig, TrainerConfig
from trainer.consumer import Trainer
from trainer.core import Outcome, Trained, TrainingConfig, WindowTrainer
from trainer.exceptions import (
    AdapterStoreError,
    BaseModelError,
    NonFiniteLossError,
    ReplayError,
    StepError,
    TrainerError,
)
from trainer.history import LineageLog, load_lineages
from trainer.lineage import Lineage
from trainer.lora import AdapterState, LoraSettings, LoraStepper, StepResult
from trainer.metrics import TrainerMetrics
from trainer.model import BaseModel, load_base_model
from trainer.replay import Replay, ReplayReport, Session
from trainer.store import AdapterStore, StoredVersion

__all__ = [
    "AdapterState",
    "AdapterStore",
    "AdapterStoreError",
    "BaseModel",
    "BaseModelError",
    "CommitState",
    "Committer",
    "Lineage",
    "LineageLog",
    "LoraSettings",
    "LoraStepper",
    "NonFiniteLossError",
    "Outcome",
    "Outgoing",
    "Replay",
    "ReplayConfig",
    "ReplayError",
    "ReplayReport",
    "Session",
    "StepError",
    "StepResult",
    "StoredVersion",
    "Trained",
    "Trainer",
    "TrainerConfig",
    "TrainerError",
    "TrainerMetrics",
    "TrainingConfig",
    "WindowTrainer",
    "load_base_model",
    "load_lineages",
]
