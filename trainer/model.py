"""The base model: any local Hugging Face causal LM directory, or the built-in tiny one.

The built-in model is a two-layer Llama with a byte-level tokenizer, made
from a config (no download) and *written to disk* on first use, so that it
is loaded by exactly the code path that loads ``--base-model PATH``. It is
built under a fixed seed, so every process on every machine gets the same
weights; the fingerprint (a hash of config and weights) lets lineages
check they continue on the base they started from.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.exceptions import BaseModelError

__all__ = [
    "BaseModel",
    "build_tiny_model_dir",
    "check_model_dir",
    "default_tiny_model_dir",
    "load_base_model",
    "resolve_device",
]

_TINY_SEED = 0


def build_tiny_model_dir(path: Path, seed: int = _TINY_SEED) -> Path:
    """Write the built-in tiny model to ``path`` (idempotent, atomic); return ``path``."""
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        ByT5Tokenizer().save_pretrained(staging)
        try:
            os.rename(staging, path)
        except OSError:
            if not (path / "model.safetensors").is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def default_tiny_model_dir(cache_root: Path, seed: int = _TINY_SEED) -> Path:
    """The built-in model's directory under ``cache_root``, built on first use."""
    return build_tiny_model_dir(cache_root / "models" / f"tiny-llama-seed{seed}", seed)


def resolve_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BaseModelError(f"device {requested!r} was asked for, but torch sees no CUDA device")
    return device


@dataclass(frozen=True)
class BaseModel:
    path: Path
    name: str
    fingerprint: str
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(
        p for p in path.iterdir() if p.suffix in (".json", ".safetensors") and "token" not in p.name
    )
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def check_model_dir(path: Path) -> Path:
    """``path`` if it looks like a Hugging Face model directory; a BaseModelError otherwise.
    Cheap: a command checks it before anything slow (Kafka, loading)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise BaseModelError(
            f"base model {path} is not a Hugging Face model directory (no config.json there); "
            "set LORASTREAM_BASE_MODEL or --base-model to a local causal LM directory"
        )
    return path


def load_base_model(path: Path, device: torch.device, name: str | None = None) -> BaseModel:
    """Load a local causal LM directory: bf16 on CUDA, fp32 on the CPU; frozen, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(path)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot load the base model in {path}: {exc}") from exc
    model.to(device)  # type: ignore[arg-type]  # transformers types `to` through a decorator
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(
        path=path,
        name=name or str(path),
        fingerprint=_fingerprint(path),
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
    )
