"""The built-in tiny model, built once per session through the trainer's own loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.model import BaseModel, build_tiny_model_dir, load_base_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def base(tiny_model_dir: Path) -> BaseModel:
    """A fresh load per test: a LoraStepper wraps (and so changes) the model it is given."""
    return load_base_model(tiny_model_dir, torch.device("cpu"))
