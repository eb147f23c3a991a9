"""The window-training core on the CPU, as the tests of the core build it: the tiny model,
its adapters under a directory of the test's."""

from __future__ import annotations

from pathlib import Path

from trainer.config import TrainingConfig
from trainer.core import WindowTrainer


def cpu_core(model_dir: Path, adapters: Path, window_size: int, **more: object) -> WindowTrainer:
    """A :class:`WindowTrainer` of the model in ``model_dir`` on the CPU, writing under
    ``adapters``; ``more`` are other :class:`TrainingConfig` fields."""
    config = TrainingConfig(
        adapter_dir=adapters,
        base_model=model_dir,
        base_model_name="tiny",
        window_size=window_size,
        device="cpu",
        **more,  # type: ignore[arg-type]
    )
    return WindowTrainer.load(config)
