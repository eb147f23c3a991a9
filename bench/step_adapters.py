"""``bench_step.py --adapters N``: N adapters' windows, one at a time against N per step.

On the same windows (each adapter its own, of each ``--kinds`` kind) it times, per
round of one window for every adapter:

* one at a time: ``LoraStepper.step`` per adapter, in turn (the trainer today);
* grouped: ``trainer.grouped.GroupedStepper.step`` over all N (one forward and
  backward over the base, each adapter its own LoRA delta and AdamW);
* plain: a PEFT model with N named adapters, ``set_adapter`` and its own AdamW
  per adapter, stepped in turn: the reference a user would write.

Per kind it prints the median round, the amortized time per window, windows per
second, the speed-ups, MFU (CUDA, where the card's peak is known), peak GiB (CUDA)
and the graphs torch compiled after warm-up (``torch._dynamo`` counters). Before
timing it checks that each grouped adapter's step equals its single step: the
largest weight difference after the first window, against the largest move.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._dynamo.utils

from trainer.batching import build_batch
from trainer.config import LoraSettings
from trainer.grouped import GroupedStepper, Member
from trainer.lora import AdapterState, LoraStepper
from trainer.model import load_base_model


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process (a recompile adds one)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def adapter_window(
    adapter: int, size: int, length: int, examples: Callable[[int, int], list[tuple[str, str]]]
) -> list[tuple[str, str]]:
    """Adapter ``adapter``'s window: the kind's examples, rotated so adapters differ."""
    window = examples(size + adapter, length)[adapter:]
    return [(f"[tenant {adapter}] {p}", r) for p, r in window]


def plain_lora_config(lora: LoraSettings) -> Any:
    """The PEFT LoraConfig a user's plain loop would write for ``lora`` (no dropout)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # typed int; PEFT divides it
        target_modules=list(lora.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


class PlainAdapters:
    """A plain PEFT loop over N named adapters of one model, stepped in turn."""

    def __init__(self, path: Path, device: torch.device, lora: LoraSettings, n: int) -> None:
        from peft import get_peft_model

        base = load_base_model(path, device)
        config = plain_lora_config(lora)
        self.model = get_peft_model(base.model, config, adapter_name="a0")
        for i in range(1, n):
            self.model.add_adapter(f"a{i}", config)
        self.model.train()
        self.tokenizer, self.device, self.max_length = base.tokenizer, device, lora.max_length
        self.optimizers = [
            torch.optim.AdamW(
                [p for name, p in self.model.named_parameters() if f".a{i}." in name],
                lr=lora.learning_rate,
            )
            for i in range(n)
        ]

    def step(self, adapter: int, examples: list[tuple[str, str]]) -> float:
        self.model.set_adapter(f"a{adapter}")
        ids, mask, labels = build_batch(self.tokenizer, examples, self.max_length)
        dev = self.device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = self.model(
                input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)
            )
        out.loss.backward()
        self.optimizers[adapter].step()
        self.optimizers[adapter].zero_grad(set_to_none=True)
        return float(out.loss.detach())


@dataclass
class Side:
    rounds: list[float] = field(default_factory=list)
    peak: int = 0
    graphs: int = 0  # compiled after warm-up


def _round(run: Callable[[], None], device: torch.device, side: Side, timed: bool) -> None:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    graphs = compiled_graphs()
    started = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize(device)
        side.peak = max(side.peak, torch.cuda.max_memory_allocated(device))
    if timed:
        side.rounds.append(time.perf_counter() - started)
        side.graphs += compiled_graphs() - graphs


def _largest_difference(
    a: AdapterState, b: AdapterState, start: AdapterState
) -> tuple[float, float]:
    diff = max(float((a.weights[k].float() - b.weights[k].float()).abs().max()) for k in a.weights)
    moved = max(
        float((b.weights[k].float() - start.weights[k].float()).abs().max()) for k in b.weights
    )
    return diff, moved


def _measure(
    stepper: LoraStepper,
    grouped: GroupedStepper,
    plain: PlainAdapters,
    lora: LoraSettings,
    batch: list[list[tuple[str, str]]],
    device: torch.device,
    warmup: int,
    windows: int,
) -> tuple[tuple[Side, Side, Side], tuple[float, float]]:
    """One kind's rounds on each side, and the grouped step's largest difference from the
    single step (with the largest move, for scale) on the first window."""
    n = len(batch)
    start = stepper.initial_state()
    first = grouped.step([Member(start, w, lora) for w in batch])
    worst = (0.0, 0.0)
    for a, result in enumerate(first):
        assert not isinstance(result, Exception), result
        single = stepper.step(start, batch[a]).state
        diff, moved = _largest_difference(result.state, single, start)
        worst = max(worst, (diff, moved))
    ones = [stepper.initial_state() for _ in range(n)]
    groups = [stepper.initial_state() for _ in range(n)]
    one, grp, ref = Side(), Side(), Side()

    def one_round() -> None:
        for a in range(n):
            ones[a] = stepper.step(ones[a], batch[a]).state

    def grouped_round() -> None:
        results = grouped.step([Member(groups[a], batch[a], lora) for a in range(n)])
        for a, result in enumerate(results):
            assert not isinstance(result, Exception), result
            groups[a] = result.state

    def plain_round() -> None:
        for a in range(n):
            plain.step(a, batch[a])

    for w in range(warmup + windows):
        for side, go in ((one, one_round), (grp, grouped_round), (ref, plain_round)):
            _round(go, device, side, w >= warmup)
    return (one, grp, ref), worst


def run(
    path: Path,
    device: torch.device,
    lora: LoraSettings,
    n: int,
    kinds: list[str],
    length_of: Callable[[str], int],
    examples: Callable[[int, int], list[tuple[str, str]]],
    window_size: int,
    warmup: int,
    windows: int,
    peak_flops: float | None,
    grouped_mm: bool | None = None,
) -> None:
    base = load_base_model(path, device)
    n_params = sum(p.numel() for p in base.model.parameters())
    stepper = LoraStepper(base, lora, seed=0)
    grouped = GroupedStepper(stepper, grouped_mm)
    plain = PlainAdapters(path, device, lora, n)
    cuda = device.type == "cuda"
    where = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
    print(
        f"\n{n} adapters on {where}: one at a time (LoraStepper.step in turn) against N per "
        f"step (GroupedStepper, grouped_mm {'on' if grouped.grouped_mm else 'off'}) against "
        f"the plain PEFT loop in turn; {warmup} warm-up + {windows} timed rounds per kind"
    )
    head = ["kind", "tokens/round", "one ms/win", "grouped ms/win", "plain ms/win",
            "grouped win/s", "vs one", "vs plain", "grouped MFU", "GiB one/grp/plain",
            "graphs after warm-up one/grp/plain", "max |grouped-single|/max move"]  # fmt: skip
    rows = []
    for kind in kinds:
        batch = [adapter_window(a, window_size, length_of(kind), examples) for a in range(n)]
        tokens = sum(int(build_batch(base.tokenizer, w, lora.max_length)[1].sum()) for w in batch)
        (one, grp, ref), worst = _measure(
            stepper, grouped, plain, lora, batch, device, warmup, windows
        )
        medians = [statistics.median(s.rounds) for s in (one, grp, ref)]
        mfu = 4 * n_params * tokens / medians[1] / peak_flops if peak_flops else None
        rows.append(
            [
                kind,
                str(tokens),
                *(f"{m / n * 1000:.2f}" for m in medians),
                f"{n / medians[1]:.1f}",
                f"{medians[0] / medians[1]:.2f}x",
                f"{medians[2] / medians[1]:.2f}x",
                "n/a" if mfu is None else f"{mfu:.1%}",
                "/".join(f"{s.peak / 2**30:.2f}" for s in (one, grp, ref)) if cuda else "n/a",
                "/".join(str(s.graphs) for s in (one, grp, ref)),
                f"{worst[0]:.2e}/{worst[1]:.2e}",
            ]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print(
        "(ms/win: a round's median over its N windows; vs one / vs plain: their time over "
        "grouped's; MFU: 4 x parameters x real tokens / round time / the card's bf16 peak)"
    )
