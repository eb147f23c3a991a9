"""Where a step's time goes: wall time against GPU-busy time, per variant of the step.

For each variant (eager; decoder layers compiled, the trainer's ``compile``
option; the whole decoder compiled) and each window kind, it runs
``--warmup`` windows, then ``--windows`` under ``torch.profiler`` and prints
the median wall time per step, the GPU's kernel time per step (their
difference is the host: Python, dispatch, launches, synchronisations), and
the operators that take the most host time and the most GPU time.

    .venv/bin/python bench/profile_step.py                      # tiny model, CPU
    python3 bench/profile_step.py --preset 1b --device cuda     # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_step import _build_1b, _examples, _length, _sync

from trainer.config import LoraSettings
from trainer.lora import LoraStepper
from trainer.model import build_tiny_model_dir, load_base_model, resolve_device


def _compile_decoder(stepper: LoraStepper) -> None:
    lm = stepper.causal_lm
    getattr(lm, str(lm.base_model_prefix)).compile(dynamic=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "1b"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--kinds", default="short,medium")
    parser.add_argument("--variants", default="eager,layers,decoder")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        path = (
            _build_1b(Path(tmp) / "1b")
            if args.preset == "1b"
            else build_tiny_model_dir(Path(tmp) / "tiny")
        )
        for variant in args.variants.split(","):
            torch._dynamo.reset()
            base = load_base_model(path, device)
            settings = LoraSettings(
                r=8, alpha=16, target_modules=("q_proj", "v_proj"), compile=variant == "layers"
            )
            stepper = LoraStepper(base, settings, seed=0)
            if variant == "decoder" and cuda:
                _compile_decoder(stepper)
            state = stepper.initial_state()
            for kind in args.kinds.split(","):
                examples = _examples(16, _length(kind))
                for _ in range(args.warmup):
                    state = stepper.step(state, examples).state
                walls = []
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                with profile(activities=activities) as prof:
                    for _ in range(args.windows):
                        _sync(device)
                        started = time.perf_counter()
                        state = stepper.step(state, examples).state
                        _sync(device)
                        walls.append(time.perf_counter() - started)
                events = prof.key_averages()
                # The kernels' own time (an operator's self device time repeats its kernels').
                kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
                gpu = sum(e.self_device_time_total for e in kernels) / 1e3 / args.windows
                wall = statistics.median(walls) * 1e3
                print(
                    f"\n== {variant} {kind}: wall {wall:.1f} ms/step (profiled), "
                    f"GPU kernels {gpu:.1f} ms/step ({gpu / wall:.0%} busy)"
                )
                print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
                if cuda:
                    print(events.table(sort_by="self_device_time_total", row_limit=args.top))
                sys.stdout.flush()
            del stepper, base, state
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
