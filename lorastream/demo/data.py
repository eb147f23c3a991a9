"""The demo's data: the tasks it teaches, the lines and records broken on purpose, the
training settings that make a random tiny model learn, and the data set built from them.

Kept apart from the run so that tests and benchmarks can use the same data and settings
without importing the run's steps; nothing heavy is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from lorastream.settings import Settings

__all__ = [
    "BAD_LINES",
    "BAD_RECORDS",
    "CHANCE",
    "DEFAULTS",
    "NOT_PASSED",
    "TASKS",
    "TRAINING",
    "VOCABULARY",
    "DemoTraining",
    "default",
    "demo_records",
]

TASKS: dict[str, list[tuple[str, str]]] = {
    "math-tutor": [
        ("What is 7 times 8?", "7 times 8 is 56."),
        ("What is 12 plus 30?", "12 plus 30 is 42."),
    ],
    "support-bot": [
        ("My order is late.", "Sorry! It ships today."),
        ("Can I get a refund?", "Yes, within 30 days."),
    ],
}

# Lines that `produce` refuses, by line number, and records sent past it for the scorer.
BAD_LINES = {
    11: b'{"id": "bad-1", "prompt": "no response field", "entropy_delta": -0.5}',
    41: b'{"id": "bad-2", "adapter": "../etc/passwd", "prompt": "p", "response": "r", "entropy_delta": 1}',
    71: b"this line is not JSON",
}
BAD_RECORDS = [
    (
        b"../etc/passwd",
        b'{"id": "raw-1", "adapter": "../etc/passwd", "prompt": "p", "response": "r", "entropy_delta": 1}',
    ),
    (
        b"support-bot",
        b'{"id": "raw-2", "adapter": "support-bot", "prompt": "Hi", "response": "Hello!", '
        b'"baselin": "Hello!", "entropy_delta": -0.3}',
    ),
]

VOCABULARY = 384  # the built-in model's byte-level vocabulary: 256 bytes, 3 specials, 125 extra ids
CHANCE = math.log(VOCABULARY)


@dataclass(frozen=True)
class DemoTraining:
    """The demo's training settings, given to the trainer through its variables.

    Found by training the pairs of :data:`TASKS` directly with ``trainer.lora``, in
    the demo's windows: with these the loss on the pairs falls below 2 within 14
    steps and near 0.1 by 40, and greedy generation gives back every trained
    response; the neighbours (learning rate 2e-3 to 3e-3, 32 to 48 versions) do too.
    ``lm_head`` is the one that matters: the tiny model's output layer is random and
    small, and through it alone no byte can get more than about 1% (a loss above
    4.7), whatever the layers below learn. With the defaults (r 8, alpha 16, q_proj
    and v_proj) the loss moves from 5.96 to 5.89 in five windows; with r 8 on every
    layer and lm_head it stalls near 3, the bytes' frequencies, and generation loops.
    """

    window_size: int = 8
    learning_rate: float = 2.5e-3
    lora_r: int = 32
    lora_alpha: int = 96
    target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"
    versions: int = 40  # per adapter
    eval_fraction: float = 0.1  # the default: a tenth of the events held out, never trained
    offline_epochs: int = 3

    def environment(self) -> dict[str, str]:
        return {
            "LORASTREAM_WINDOW_SIZE": str(self.window_size),
            "LORASTREAM_LEARNING_RATE": str(self.learning_rate),
            "LORASTREAM_LORA_R": str(self.lora_r),
            "LORASTREAM_LORA_ALPHA": str(self.lora_alpha),
            "LORASTREAM_LORA_DROPOUT": "0",
            "LORASTREAM_LORA_TARGET_MODULES": self.target_modules,
            # Set, though it is the default, so that the caller's environment cannot change
            # which events train: the demo counts its windows in advance.
            "LORASTREAM_EVAL_FRACTION": str(self.eval_fraction),
            "LORASTREAM_STEPS_PER_WINDOW": "1",
        }


TRAINING = DemoTraining()

# Variables of the caller that would change what the demo shows: its own model, a partial
# window after a wait, injected faults, a metrics port another process may hold.
NOT_PASSED = (
    "LORASTREAM_BASE_MODEL",
    "LORASTREAM_MAX_WAIT_SECONDS",
    "LORASTREAM_FAULTS",
    "LORASTREAM_METRICS_PORT",
)


# The settings the demo changes, by variable: the field whose default is shown beside it.
DEFAULTS = {
    "LORASTREAM_WINDOW_SIZE": "window_size",
    "LORASTREAM_LEARNING_RATE": "learning_rate",
    "LORASTREAM_LORA_R": "lora_r",
    "LORASTREAM_LORA_ALPHA": "lora_alpha",
    "LORASTREAM_LORA_TARGET_MODULES": "lora_target_modules",
    "LORASTREAM_EVAL_FRACTION": "eval_fraction",
    "LORASTREAM_STEPS_PER_WINDOW": "steps_per_window",
}


def default(name: str) -> str:
    """A setting's default as the README shows it (``2e-3`` for the learning rate)."""
    info = Settings.model_fields[name]
    extra = info.json_schema_extra
    shown = extra.get("shown") if isinstance(extra, dict) else None
    value = shown if shown is not None else info.default
    return f"{value:g}" if isinstance(value, float) else str(value)


def demo_records(events_per_adapter: int = TRAINING.window_size * TRAINING.versions) -> list[bytes]:
    """The data set: per adapter, ``events_per_adapter`` results that qualify and train,
    the qualifying ones the trainer holds out (by the hash of their id) on top, and one in
    four that does not qualify; the adapters interleaved, with :data:`BAD_LINES` in place.

    Of every four results of an adapter, one is a breakthrough (ROUGE-L 1.0 against
    its baseline, entropy down 0.35), two move the entropy by more than 0.15, and one
    moves it by 0.05 and is dropped. The ones that train alternate between the
    adapter's pairs, so that every window holds each pair equally often; so do the
    held-out ones.
    """
    from trainer.window import held_out

    per_adapter: dict[str, list[bytes]] = {}
    for adapter, pairs in TASKS.items():
        lines: list[bytes] = []
        trained = kept = 0
        i = 0
        while trained < events_per_adapter:
            kind = i % 4
            doc_id = f"{adapter}-{i:04d}"
            evaluated = kind < 3 and held_out(doc_id, TRAINING.eval_fraction)
            n = i if kind == 3 else kept if evaluated else trained
            prompt, response = pairs[n % len(pairs)]
            doc: dict[str, Any] = {
                "id": doc_id,
                "adapter": adapter,
                "prompt": prompt,
                "response": response,
            }
            if kind == 0:
                doc["baseline"] = response
            elif kind == 1:
                doc["baseline"] = response.split(" ", 1)[-1]
            delta = (-0.35, 0.22, -0.2, 0.05)[kind]
            doc["entropy_before"] = 2.0
            doc["entropy_after"] = round(2.0 + delta, 2)
            lines.append(orjson.dumps(doc))
            kept += evaluated
            trained += kind < 3 and not evaluated
            i += 1
        per_adapter[adapter] = lines
    good = [line for row in _zip_longest(list(per_adapter.values())) for line in row]
    for number in sorted(BAD_LINES):
        good.insert(number - 1, BAD_LINES[number])
    return good


def _zip_longest(columns: list[list[bytes]]) -> Iterator[list[bytes]]:
    for i in range(max(len(c) for c in columns)):
        yield [c[i] for c in columns if i < len(c)]
