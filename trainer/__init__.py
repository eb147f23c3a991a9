"""The training stage: windows of learning events → LoRA steps → announced adapter versions.

One core, two drivers. :class:`WindowTrainer` (``trainer.core``) trains one
window into one lineage with no Kafka in it: step, retries, durable files,
the AdapterUpdate or the quarantine record. :class:`Trainer`
(``trainer.consumer``) is the live consumer-group loop; :class:`Replay`
(``trainer.replay``) retrains a lineage from a range of the log. Both ask the
core for a window's outcome, commit it through one :class:`Committer`
(``trainer.committer``), then record it in the :class:`Lineage`, and group
events with one rule (``trainer.window``). ``trainer.lora`` is the step, ``trainer.model``
the base model, ``trainer.store`` the adapter files, ``trainer.lineage`` a lineage and
``trainer.history`` its log read back from Kafka; ``trainer.committed`` is the one
read_committed reader (and offsets, lag), ``trainer.ranges`` replay's ranges. The stage takes its
configuration as arguments and never reads the environment.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.committer import CommitState, Committer, Outgoing
    from trainer.config import LoraSettings, ReplayConfig, TrainerConfig, TrainingConfig
    from trainer.consumer import Trainer
    from trainer.core import Outcome, Trained, WindowTrainer
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
    from trainer.lora import AdapterState, LoraStepper, StepResult
    from trainer.metrics import TrainerMetrics
    from trainer.model import BaseModel, load_base_model
    from trainer.replay import Replay, ReplayReport, Session
    from trainer.store import AdapterStore, StoredVersion

_WHERE = {
    "AdapterState": "trainer.lora",
    "AdapterStore": "trainer.store",
    "AdapterStoreError": "trainer.exceptions",
    "BaseModel": "trainer.model",
    "BaseModelError": "trainer.exceptions",
    "CommitState": "trainer.committer",
    "Committer": "trainer.committer",
    "Lineage": "trainer.lineage",
    "LineageLog": "trainer.history",
    "LoraSettings": "trainer.config",
    "LoraStepper": "trainer.lora",
    "NonFiniteLossError": "trainer.exceptions",
    "Outcome": "trainer.core",
    "Outgoing": "trainer.committer",
    "Replay": "trainer.replay",
    "ReplayConfig": "trainer.config",
    "ReplayError": "trainer.exceptions",
    "ReplayReport": "trainer.replay",
    "Session": "trainer.replay",
    "StepError": "trainer.exceptions",
    "StepResult": "trainer.lora",
    "StoredVersion": "trainer.store",
    "Trained": "trainer.core",
    "Trainer": "trainer.consumer",
    "TrainerConfig": "trainer.config",
    "TrainerError": "trainer.exceptions",
    "TrainerMetrics": "trainer.metrics",
    "TrainingConfig": "trainer.config",
    "WindowTrainer": "trainer.core",
    "load_base_model": "trainer.model",
    "load_lineages": "trainer.history",
}


def __getattr__(name: str) -> Any:
    """Import on first use: ``trainer.kafka`` or ``trainer.history`` alone must not pull
    in torch (1.5 s), which the light commands (list, follow) never need."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


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
