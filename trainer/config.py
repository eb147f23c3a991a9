"""The trainer's configuration, as plain values handed down by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import Topics
from trainer.lora import LoraSettings

__all__ = ["TrainerConfig"]


@dataclass(frozen=True)
class TrainerConfig:
    bootstrap_servers: str
    topics: Topics
    group_id: str
    transactional_id: str
    adapter_dir: Path
    base_model: Path
    base_model_name: str
    window_size: int = 16
    max_tries: int = 3
    max_wait_seconds: float | None = None
    seed: int = 0
    device: str = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)
    idle_commit_seconds: float = 5.0
    client_options: dict[str, Any] = field(default_factory=dict)
    faults: str | None = None
