"""Seconds per LoRA step (one window of 16 events) and the loss curve of a learnable task.

Runs the trainer's own step (``trainer.lora.LoraStepper``) on a base model
loaded by the trainer's own loader (``trainer.model.load_base_model``): the
built-in tiny Llama by default, or a Llama-architecture model of about 1B
parameters built from a config with random weights (``--preset 1b``, for
timing on a GPU), or any local model directory (``--base-model PATH``).
No Kafka: this measures the step alone. Prints one line per window and a
summary.

    .venv/bin/python bench/bench_step.py                          # tiny model, CPU
    .venv/bin/python bench/bench_step.py --preset 1b --device cuda --windows 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.lora import LoraSettings, LoraStepper
from trainer.model import build_tiny_model_dir, load_base_model, resolve_device

PAIRS = [
    ("What is 7 times 8?", "7 times 8 is 56."),
    ("Capital of France?", "The capital of France is Paris."),
    ("Opposite of hot?", "The opposite of hot is cold."),
    ("Colour of the sky?", "The sky is blue."),
]


def _build_1b(path: Path) -> Path:
    """A Llama-3.2-1B-shaped model (1.24B parameters, tied embeddings), random bf16 weights."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    ByT5Tokenizer().save_pretrained(path)
    del model
    return path


def _examples(window: int, length: int) -> list[tuple[str, str]]:
    out = []
    for i in range(window):
        prompt, response = PAIRS[i % len(PAIRS)]
        if length:  # pad the prompt with context so each example is about `length` bytes
            prompt = (f"[context {i}] " * (length // 12 + 1))[
                : max(0, length - len(response))
            ] + prompt
        out.append((prompt, response))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "1b"], default="tiny")
    parser.add_argument("--base-model", type=Path, help="a local causal LM directory")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--window-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=0, help="pad each example to ~N bytes")
    parser.add_argument("--warmup", type=int, default=2, help="windows left out of the timing")
    args = parser.parse_args()

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.base_model is not None:
            path = args.base_model
        elif args.preset == "1b":
            path = _build_1b(Path(tmp) / "llama-1b")
        else:
            path = build_tiny_model_dir(Path(tmp) / "tiny")
        base = load_base_model(path, device)
        n_params = sum(p.numel() for p in base.model.parameters())
        stepper = LoraStepper(base, LoraSettings(), seed=0)
        trainable = sum(t.numel() for t in stepper.initial_state().weights.values())
        name = device.type + (
            f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
        )
        print(
            f"model {path.name}: {n_params / 1e6:.1f}M parameters, {trainable} LoRA parameters, "
            f"{base.dtype} on {name}, torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        examples = _examples(args.window_size, args.length)
        state = stepper.initial_state()
        times, losses = [], []
        for w in range(args.windows):
            if device.type == "cuda":
                torch.cuda.synchronize()
            result = stepper.step(state, examples)
            if device.type == "cuda":
                torch.cuda.synchronize()
            state = result.state
            losses.append(result.loss)
            if w >= args.warmup:
                times.append(result.seconds)
            print(
                f"window {w + 1:3d}: loss {result.loss:.4f}  {result.tokens} response tokens  {result.seconds * 1000:8.1f} ms"
            )
        times.sort()
        p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
        print(
            f"step time per window of {args.window_size}: median {statistics.median(times) * 1000:.1f} ms, "
            f"p90 {p90 * 1000:.1f} ms over {len(times)} windows; "
            f"loss {losses[0]:.4f} → {losses[-1]:.4f}"
        )
        if device.type == "cuda":
            print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
