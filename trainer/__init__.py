"""The training stage: windows of learning events → LoRA steps → announced adapter versions.

``trainer.consumer.Trainer`` is the Kafka loop (windows, transactions, resume,
quarantine); ``trainer.lora`` the step, ``trainer.model`` the base model,
``trainer.store`` the adapter files, ``trainer.lineage`` the history read
back from Kafka. The stage takes a :class:`TrainerConfig` and never reads the
environment, so it can be used as a library.
"""

from trainer.config import TrainerConfig
from trainer.consumer import Trainer
from trainer.exceptions import (
    AdapterStoreError,
    BaseModelError,
    NonFiniteLossError,
    StepError,
    TrainerError,
)
from trainer.lineage import Lineage, load_lineages
from trainer.lora import AdapterState, LoraSettings, LoraStepper, StepResult
from trainer.metrics import TrainerMetrics
from trainer.model import BaseModel, load_base_model
from trainer.store import AdapterStore, StoredVersion

__all__ = [
    "AdapterState",
    "AdapterStore",
    "AdapterStoreError",
    "BaseModel",
    "BaseModelError",
    "Lineage",
    "LoraSettings",
    "LoraStepper",
    "NonFiniteLossError",
    "StepError",
    "StepResult",
    "StoredVersion",
    "Trainer",
    "TrainerConfig",
    "TrainerError",
    "TrainerMetrics",
    "load_base_model",
    "load_lineages",
]
