"""TrainerConfig from the CLI's settings (the only place the two meet)."""

from __future__ import annotations

from typing import Any

from trainer.config import TrainerConfig
from trainer.lora import LoraSettings
from trainer.model import TINY_MODEL_NAME, default_tiny_model_dir

__all__ = ["trainer_config"]


def trainer_config(settings: Any, faults: str | None = None) -> TrainerConfig:
    """Build the trainer's configuration; the built-in tiny model is made on first use."""
    if settings.base_model is None:
        base_model = default_tiny_model_dir(settings.home)
        base_name = TINY_MODEL_NAME
    else:
        base_model = settings.base_model
        base_name = str(settings.base_model)
    lora_kwargs: dict[str, Any] = {
        "r": settings.lora_r,
        "alpha": settings.lora_alpha,
        "dropout": settings.lora_dropout,
        "target_modules": settings.target_modules,
    }
    if settings.learning_rate is not None:
        lora_kwargs["learning_rate"] = settings.learning_rate
    return TrainerConfig(
        bootstrap_servers=settings.bootstrap_servers,
        topics=settings.topics,
        group_id=settings.trainer_group_id,
        transactional_id=settings.transactional_id,
        adapter_dir=settings.adapter_dir,
        base_model=base_model,
        base_model_name=base_name,
        window_size=settings.window_size,
        max_tries=settings.max_tries,
        max_wait_seconds=settings.max_wait_seconds,
        seed=settings.seed,
        device=settings.device,
        lora=LoraSettings(**lora_kwargs),
        client_options=settings.kafka_client_options(),
        faults=faults,
    )
