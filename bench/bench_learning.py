"""Does streaming learn nearly as well as an offline fine-tune on the same data? (issue #11)

A learnable synthetic task for the built-in tiny model: three adapters, each
with its own rule turning a made-up word into a response (``reverse`` spells it
backwards, ``shout`` upper-cases it, ``greet`` says hello to it). A tenth of
each adapter's words, chosen by a hash of the pair's id, is held out: never
produced, it is that adapter's evaluation set (with the rule's true responses).
The rest are produced as GenerationResults, each word several times, one
response in ten perturbed (a letter replaced) and one result in eight too dull
to qualify under the scoring rule.

They go through the real pipeline: fresh ``bench…`` topics, ``lorastream score``
and ``lorastream train`` as processes (windows of 16, the demo's LoRA settings),
the announcements followed until every full window is a version. Then

(a) every version of every adapter is loaded from its files (the
    announcement's ``uri``) and measured on the adapter's held-out pairs: the
    mean cross-entropy per response token, as the trainer computes its loss;
(b) an offline reference fine-tunes a fresh LoRA with the same model and
    settings on exactly the events of the adapter's windows (their
    ``event_ids``), shuffled, in batches of 16, for several epochs, one AdamW
    step per batch (``LoraStepper.step``, the trainer's own step), and is
    measured the same way after each epoch.

It prints per adapter the streamed and offline held-out losses, their ratio and
the base model's, with the issue's goal (streamed within 10% of offline), and
draws the loss per version (``$LORASTREAM_HOME/bench/learning-<run>.png``).
Topics and the temporary directory are removed at the end, also on failure.
Uses KAFKA_BOOTSTRAP_SERVERS if set, else the broker at 127.0.0.1:9092 if one
answers, else starts a local one on free ports for the run.

With ``--steps-per-window K`` the trainer takes K AdamW steps on each window
(``LORASTREAM_STEPS_PER_WINDOW``); the offline run keeps one step per batch.
``--rehearsal k`` (``LORASTREAM_REHEARSAL``, with ``--rehearsal-buffer``) mixes k
earlier events into each step; the offline run has none. ``--learning-rate`` and
``--target-modules`` change both runs (the offline one is always trained with the
stream's LoRA settings); left out, they are the demo's, as in every figure before
issue #23.

    .venv/bin/python bench/bench_learning.py [--repeats 4] [--epochs 3] [--steps-per-window 1]
        [--rehearsal 0] [--rehearsal-buffer 256] [--learning-rate 2.5e-3]
        [--target-modules LIST] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.broker import bench_bootstrap
from bench.report import Row, add_json_option, write_json
from bench.workers import bench_workers
from lorastream.demo.data import TRAINING
from lorastream.demo.picture import Panel, draw_learning
from lorastream.dev.broker import kafka_answers
from lorastream.dev.topics import produce
from lorastream.dev.workers import Worker, worker_env
from lorastream.ops.admin import create_topics, topic_specs
from lorastream.ops.follow import follow
from lorastream.settings import default_home, load_settings
from lorastream.stages import lora_settings
from schemas import AdapterUpdate, GenerationResult, KafkaPosition, Topics, encode
from streams.scoring import Thresholds, process
from trainer.kafka import KafkaConnection
from trainer.offline import fine_tune

WINDOW = 16
HOLD_OUT = 10  # one pair in HOLD_OUT is held out (by a hash of its id)
NOISE = 0.1  # share of produced responses with one letter replaced
GOAL = 1.10  # the goal: streamed held-out loss within 10% of the offline one
DATA_SEED = 11

RULES: dict[str, tuple[Callable[[str], str], Callable[[str], str]]] = {
    "reverse": (lambda w: f"reverse: {w}", lambda w: w[::-1]),
    "shout": (lambda w: f"shout: {w}", lambda w: f"{w.upper()}!"),
    "greet": (lambda w: f"name: {w}", lambda w: f"Hello, {w.capitalize()}."),
}

# Variables of the caller that would change what the workers do (cf. lorastream.demo).
_NOT_PASSED = (
    "LORASTREAM_BASE_MODEL",
    "LORASTREAM_MAX_WAIT_SECONDS",
    "LORASTREAM_FAULTS",
    "LORASTREAM_METRICS_PORT",
)


@dataclass(frozen=True)
class Task:
    """One adapter's data: the pairs it may train on, the held-out pairs, what is produced."""

    adapter: str
    train: list[tuple[str, str]]
    held_out: list[tuple[str, str]]
    results: list[GenerationResult]


def _words(n: int, rng: random.Random) -> list[str]:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        syllables = rng.randint(2, 3)
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(words)


def _held_out(pair_id: str) -> bool:
    return int(hashlib.sha256(pair_id.encode()).hexdigest(), 16) % HOLD_OUT == 0


def _perturb(text: str, rng: random.Random) -> str:
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    i = rng.choice(letters)
    swap = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != text[i].lower()])
    return text[:i] + (swap.upper() if text[i].isupper() else swap) + text[i + 1 :]


def make_tasks(words: int, repeats: int) -> list[Task]:
    """Per adapter: its pairs split by hash, then ``repeats`` results per training pair,
    shuffled; result ``k`` of an adapter is dull (does not qualify) when ``k % 8 == 7``."""
    rng = random.Random(DATA_SEED)
    vocabulary = _words(words, rng)
    tasks = []
    for adapter, (prompt_of, response_of) in RULES.items():
        train, held = [], []
        for word in vocabulary:
            pair = (prompt_of(word), response_of(word))
            (held if _held_out(f"{adapter}-{word}") else train).append(pair)
        produced = [(r, pair) for pair in train for r in range(repeats)]
        rng.shuffle(produced)
        results = []
        for k, (r, (prompt, response)) in enumerate(produced):
            said = _perturb(response, rng) if rng.random() < NOISE else response
            common: dict[str, Any] = {
                "id": f"{adapter}-{prompt.split(': ')[1]}-{r}",
                "adapter": adapter,
                "prompt": prompt,
                "response": said,
            }
            if k % 8 == 7:  # |Δentropy| 0.05 and an unrelated baseline: the scorer drops it
                doc = {**common, "baseline": "no idea", "entropy_delta": -0.05}
            elif k % 2 == 0:  # a breakthrough: the baseline is the right answer, entropy down
                doc = {**common, "baseline": response, "entropy_delta": -0.3}
            else:  # a big entropy change, no baseline
                doc = {**common, "entropy_delta": 0.25}
            results.append(GenerationResult(**doc))
        tasks.append(Task(adapter, train, held, results))
    return tasks


def _interleaved(tasks: list[Task]) -> list[GenerationResult]:
    longest = max(len(t.results) for t in tasks)
    return [t.results[i] for i in range(longest) for t in tasks if i < len(t.results)]


def _qualifying(results: list[GenerationResult], topic: str) -> dict[str, int]:
    """Per adapter, the results the scorer will emit: its own rule, applied here."""
    counts: dict[str, int] = {}
    where = KafkaPosition(topic, 0, 0)
    for result in results:
        if process(encode(result), where, None, Thresholds()).event is not None:
            counts[result.adapter] = counts.get(result.adapter, 0) + 1
    return counts


@contextmanager
def _bootstrap(tmp: Path) -> Iterator[str]:
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and kafka_answers("127.0.0.1:9092"):
        yield "127.0.0.1:9092"
        return
    with bench_bootstrap(tmp) as bootstrap:
        yield bootstrap


class Clock:
    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.stages: list[tuple[str, float]] = []

    def lap(self, stage: str) -> float:
        now = time.perf_counter()
        self.stages.append((stage, now - self.last))
        self.last = now
        return self.stages[-1][1]


class Evaluator:
    """One PeftModel over the base: any adapter's weights are loaded into it and measured."""

    def __init__(self, base_model: Path, lora: Any) -> None:
        import torch

        from trainer.lora import LoraStepper
        from trainer.model import load_base_model

        self.torch = torch
        self.base = load_base_model(base_model, torch.device("cpu"))
        self.stepper = LoraStepper(self.base, lora, seed=0)

    def set_weights(self, weights: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.stepper.model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"{len(unexpected)} unexpected LoRA tensors, e.g. {unexpected[0]}")

    def load_version(self, update: AdapterUpdate) -> None:
        from safetensors.torch import load_file

        directory = Path(update.uri.removeprefix("file://"))
        self.set_weights(load_file(directory / "adapter_model.safetensors"))

    def loss(self, pairs: list[tuple[str, str]], adapter: bool = True) -> float:
        from trainer.batching import build_batch

        model = self.stepper.model
        ids, mask, labels = build_batch(self.base.tokenizer, pairs, self.stepper.lora.max_length)
        model.eval()
        with self.torch.no_grad():
            if adapter:
                return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
            with model.disable_adapter():
                return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


async def _follow_versions(
    bootstrap: str, topic: str, total: int, workers: dict[str, Worker], timeout: float
) -> list[AdapterUpdate]:
    updates: list[AdapterUpdate] = []
    following = asyncio.create_task(
        follow(
            KafkaConnection(bootstrap),
            topic,
            lambda update, _raw: updates.append(update),
            from_beginning=True,
            count=total,
            timeout=timeout,
        )
    )
    while not following.done():
        await asyncio.wait({following}, timeout=0.5)
        for name, worker in workers.items():
            if not worker.alive() and not following.done():
                following.cancel()
                with suppress(asyncio.CancelledError):
                    await following
                tail = "\n".join(worker.output().splitlines()[-15:])
                raise RuntimeError(f"the {name} stopped before every version came:\n{tail}")
    following.result()
    if len(updates) < total:
        raise RuntimeError(f"only {len(updates)} of {total} versions came within {timeout:.0f}s")
    return updates


@dataclass(frozen=True)
class Params:
    words: int = 120
    repeats: int = 4
    epochs: int = 3
    steps_per_window: int = 1
    timeout: float = 300
    shuffles: int = 3
    json: Path | None = None
    rehearsal: int = 0
    rehearsal_buffer: int = 256
    learning_rate: float = TRAINING.learning_rate
    target_modules: str = TRAINING.target_modules


def _variant(params: Params) -> str:
    """The title's tail naming what differs from the demo's training ("" when nothing)."""
    parts = []
    if params.steps_per_window != 1:
        parts.append(f"{params.steps_per_window} steps per window")
    if params.rehearsal:
        parts.append(f"rehearsal {params.rehearsal}")
    if params.learning_rate != TRAINING.learning_rate:
        parts.append(f"lr {params.learning_rate:g}")
    if params.target_modules != TRAINING.target_modules:
        parts.append(f"targets {params.target_modules}")
    return f", with {' and '.join(parts)} (#23)" if parts else ""


def run(params: Params) -> None:
    clock = Clock()
    tmp = Path(tempfile.mkdtemp(prefix="bench-learning-"))
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    topics = Topics.named(prefix)
    png = default_home() / "bench" / f"learning-{prefix.rstrip('.')}.png"
    try:
        with _bootstrap(tmp) as bootstrap, bench_workers(bootstrap, prefix) as workers:
            asyncio.run(create_topics(KafkaConnection(bootstrap), topic_specs(topics, 3, 1)))
            clock.lap("broker and topics")
            _bench(
                bootstrap,
                prefix,
                topics,
                tmp,
                png,
                workers,
                clock,
                params,
            )
            clock.lap("plot")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed {tmp}")
    clock.lap("clean-up")
    total = time.perf_counter() - clock.started
    print(f"\ntimings (total {total:.1f}s):")
    for stage, seconds in clock.stages:
        print(f"  {stage:<56} {seconds:6.1f}s")


def _bench(
    bootstrap: str,
    prefix: str,
    topics: Topics,
    tmp: Path,
    png: Path,
    workers: dict[str, Worker],
    clock: Clock,
    params: Params,
) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)  # the tiny model's ops are microseconds; threads only contend
    words, repeats, epochs, timeout = params.words, params.repeats, params.epochs, params.timeout
    tasks = make_tasks(words, repeats)
    results = _interleaved(tasks)
    qualifying = _qualifying(results, topics.generation_results)
    expected = {adapter: n // WINDOW for adapter, n in qualifying.items()}
    env_lora = {
        **TRAINING.environment(),
        "LORASTREAM_WINDOW_SIZE": str(WINDOW),
        "LORASTREAM_STEPS_PER_WINDOW": str(params.steps_per_window),
        "LORASTREAM_LEARNING_RATE": str(params.learning_rate),
        "LORASTREAM_LORA_TARGET_MODULES": params.target_modules,
        "LORASTREAM_REHEARSAL": str(params.rehearsal),
        "LORASTREAM_REHEARSAL_BUFFER": str(params.rehearsal_buffer),
    }
    settings = load_settings(
        window_size=WINDOW,
        learning_rate=params.learning_rate,
        lora_r=TRAINING.lora_r,
        lora_alpha=TRAINING.lora_alpha,
        lora_dropout=0.0,
        lora_target_modules=params.target_modules,
    )
    # The offline run takes one step per batch whatever the trainer takes per window.
    lora = replace(lora_settings(settings), steps_per_window=1)
    print(f"broker {bootstrap}, topics {prefix}*, work in {tmp}")
    print(
        f"task: {len(tasks)} adapters, {words} made-up words each; one pair in {HOLD_OUT} held out "
        f"by hash; {repeats} results per training pair, {NOISE:.0%} of responses perturbed, "
        "1 in 8 too dull to qualify"
    )
    for task in tasks:
        prompt, response = task.train[0]
        print(
            f"  {task.adapter:<8} {prompt!r} -> {response!r}: {len(task.train)} training pairs, "
            f"{len(task.held_out)} held out; {len(task.results)} results, "
            f"{qualifying[task.adapter]} qualify -> {expected[task.adapter]} windows of {WINDOW}"
        )
    print(
        f"LoRA (both runs): r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, "
        f"target_modules {','.join(lora.target_modules)}, AdamW lr {lora.learning_rate:g}, "
        f"weight decay {lora.weight_decay:g}, seed {settings.seed}; windows/batches of {WINDOW}; "
        "the trainer's own hold-out off (LORASTREAM_EVAL_FRACTION=0); "
        f"the trainer takes {params.steps_per_window} step(s) per window "
        f"(LORASTREAM_STEPS_PER_WINDOW) with {params.rehearsal} rehearsed event(s) "
        f"(LORASTREAM_REHEARSAL, buffer {params.rehearsal_buffer}), the offline run one step "
        "per batch"
    )

    asyncio.run(
        produce(
            bootstrap,
            topics.generation_results,
            [(r.adapter.encode(), encode(r)) for r in results],
        )
    )
    clock.lap("produce")
    print(f"produced {len(results)} results to {topics.generation_results}")

    env = {k: v for k, v in os.environ.items() if k not in _NOT_PASSED}
    env.update(
        worker_env(
            bootstrap,
            prefix,
            tmp / "home",
            LORASTREAM_ADAPTER_DIR=str(tmp / "adapters"),
            LORASTREAM_DEVICE="cpu",
            OMP_NUM_THREADS="1",
            **{
                **env_lora,
                # The bench holds out whole pairs itself (never produced); the trainer's
                # own event-level hold-out would take a tenth of the events out of the
                # windows.
                "LORASTREAM_EVAL_FRACTION": "0",
            },
        )
    )
    for name, args in (("scorer", ["score"]), ("trainer", ["train"])):
        workers[name] = Worker(args, env, tmp / f"{name}.log").start()
    total = sum(expected.values())
    started = time.perf_counter()
    received = asyncio.run(
        _follow_versions(bootstrap, topics.adapter_updates, total, workers, timeout)
    )
    streaming = time.perf_counter() - started
    first = min(u.created_at for u in received)
    last = max(u.created_at for u in received)
    print(
        f"{len(received)} versions announced {streaming:.1f}s after the workers' start "
        f"(first to last version: {(last - first).total_seconds():.1f}s, "
        f"{(last - first).total_seconds() / max(len(received) - 1, 1):.2f}s per version)"
    )
    for worker in workers.values():
        worker.terminate()
    clock.lap("score + train (processes) until the last version, stop")

    updates: dict[str, list[AdapterUpdate]] = {t.adapter: [] for t in tasks}
    for update in sorted(received, key=lambda u: (u.adapter, u.version)):
        updates[update.adapter].append(update)
        spec = update.lora
        if (spec.r, float(spec.alpha), tuple(sorted(spec.target_modules))) != (
            lora.r,
            float(lora.alpha),
            tuple(sorted(lora.target_modules)),
        ):
            raise RuntimeError(f"{update.adapter} v{update.version} was trained with {spec}")
    base_model = Path(received[0].base_model)

    # (a) each version from its files, on the adapter's held-out pairs
    evaluator = Evaluator(base_model, lora)
    base = {t.adapter: evaluator.loss(t.held_out, adapter=False) for t in tasks}
    streamed: dict[str, list[float]] = {}
    for task in tasks:
        streamed[task.adapter] = []
        for update in updates[task.adapter]:
            evaluator.load_version(update)
            streamed[task.adapter].append(evaluator.loss(task.held_out))
    clock.lap(f"held-out loss of {len(received)} versions")

    # (b) offline: the same events, shuffled, several epochs; several shuffles, as the
    # order alone moves the result by more than the goal's 10%
    by_id = {r.id: r for r in results}
    offline: dict[str, list[float]] = {}  # per epoch, the mean over the shuffles
    spread: dict[str, list[float]] = {}  # after the last epoch, per shuffle
    steps = 0
    for task in tasks:
        events = [
            (by_id[i].prompt, by_id[i].response)
            for u in updates[task.adapter]
            for i in u.window.event_ids
        ]
        per_epoch: list[list[float]] = [[] for _ in range(epochs)]
        for shuffle in range(params.shuffles):
            seed = f"offline-{task.adapter}" + (f"-{shuffle}" if shuffle else "")
            states = fine_tune(evaluator.stepper, events, WINDOW, epochs, seed)
            steps += epochs * -(-len(events) // WINDOW)
            for epoch, state in enumerate(states):
                evaluator.set_weights(state.weights)
                per_epoch[epoch].append(evaluator.loss(task.held_out))
        offline[task.adapter] = [sum(e) / len(e) for e in per_epoch]
        spread[task.adapter] = per_epoch[-1]
    offline_seconds = clock.lap(
        f"offline fine-tune, {epochs} epochs x {params.shuffles} shuffles ({steps} steps)"
    )
    print(f"offline fine-tune: {steps} steps in {offline_seconds:.1f}s, in this process")

    print(
        f"\nheld-out loss (mean nats per response token; chance ln 384 = 5.95), "
        f"streamed = newest version, offline = after {epochs} epochs, the mean of "
        f"{params.shuffles} shuffles (their range beside it):"
    )
    header = (
        f"  {'adapter':<8} {'events':>6} {'vers':>4} {'base':>6} {'streamed':>8} "
        f"{'offline':>7} {'ratio':>6} {'offline range':>13}   offline after each epoch"
    )
    print(header)
    ratios = []
    for task in tasks:
        a = task.adapter
        final, reference = streamed[a][-1], offline[a][-1]
        ratios.append(final / reference)
        low, high = min(spread[a]), max(spread[a])
        print(
            f"  {a:<8} {len(updates[a]) * WINDOW:>6} {len(updates[a]):>4} {base[a]:>6.3f} "
            f"{final:>8.3f} {reference:>7.3f} {final / reference:>6.3f} "
            f"{f'{low:.3f}-{high:.3f}':>13}   " + " ".join(f"{x:.3f}" for x in offline[a])
        )
    mean = {
        "base": sum(base.values()) / len(tasks),
        "streamed": sum(s[-1] for s in streamed.values()) / len(tasks),
        "offline": sum(o[-1] for o in offline.values()) / len(tasks),
    }
    mean_ratio = sum(ratios) / len(ratios)
    print(
        f"  {'mean':<8} {'':>6} {'':>4} {mean['base']:>6.3f} {mean['streamed']:>8.3f} "
        f"{mean['offline']:>7.3f} {mean_ratio:>6.3f}"
    )
    for task in tasks:
        a = task.adapter
        best = min(range(len(streamed[a])), key=streamed[a].__getitem__)
        print(
            f"  {a}: streamed held-out loss at v1 {streamed[a][0]:.3f}, best "
            f"{streamed[a][best]:.3f} at v{best + 1}, newest {streamed[a][-1]:.3f}"
        )
    epoch1 = sum(o[0] for o in offline.values()) / len(tasks)
    print(
        f"  (offline after 1 epoch, {1 / params.steps_per_window:.2g} times the stream's "
        f"steps: mean {epoch1:.3f}, streamed/that {mean['streamed'] / epoch1:.3f})"
    )
    met = all(r <= GOAL for r in ratios)
    print(
        f"goal (streamed held-out loss within {GOAL - 1:.0%} of offline, per adapter): "
        f"{'MET' if met else 'NOT MET'} (ratios {', '.join(f'{r:.3f}' for r in ratios)})"
    )
    print(
        "train loss of the first and last version: "
        + "; ".join(
            f"{a} {u[0].train_loss:.3f} -> {u[-1].train_loss:.3f}" for a, u in updates.items()
        )
    )

    draw_learning(
        png,
        [
            Panel(
                title=f"{t.adapter} ({len(t.held_out)} held-out pairs)",
                versions=[u.version for u in updates[t.adapter]],
                train=[u.train_loss for u in updates[t.adapter]],
                held_out=list(streamed[t.adapter]),
                base=base[t.adapter],
                offline=offline[t.adapter][-1],
                offline_label=f"offline, {epochs} epochs (mean of {params.shuffles} shuffles)",
            )
            for t in tasks
        ],
        f"streamed vs offline ({epochs} epochs) on the same events: LoRA r {lora.r}, "
        f"lr {lora.learning_rate:g}, windows of {WINDOW}",
        f"version ({params.steps_per_window} AdamW step(s) per window of {WINDOW})",
    )
    print(f"picture: {png}")
    if params.json is not None:
        rows = []
        for task, ratio in zip(tasks, ratios, strict=True):
            a = task.adapter
            rows.append(
                Row(
                    f"{a}: streamed held-out loss, newest version (v{len(updates[a])})",
                    f"{streamed[a][-1]:.3f} nats/token ({ratio:.3f}x offline)",
                    goal=f"within {GOAL - 1:.0%} of the offline run after the same events",
                    reference=f"{offline[a][-1]:.3f} nats/token (offline fine-tune)",
                    met=ratio <= GOAL,
                )
            )
        rows.append(
            Row(
                "mean over adapters: streamed held-out loss",
                f"{mean['streamed']:.3f} nats/token ({mean_ratio:.3f}x offline)",
                reference=f"{mean['offline']:.3f} nats/token (offline fine-tune)",
            )
        )
        rows.append(
            Row(
                "mean over adapters: base model's held-out loss",
                f"{mean['base']:.3f} nats/token",
                reference="5.95 nats/token (chance, ln 384)",
            )
        )
        rows.append(
            Row(
                "streaming: first to last version",
                f"{(last - first).total_seconds() / max(len(received) - 1, 1):.2f} s per version",
            )
        )
        ranges = "; ".join(
            f"{t.adapter} {min(spread[t.adapter]):.3f}-{max(spread[t.adapter]):.3f}" for t in tasks
        )
        write_json(
            params.json,
            "Does it learn? Streamed against offline held-out loss (#11)" + _variant(params),
            rows,
            [
                f"{len(tasks)} adapters x {words} made-up words, one pair in {HOLD_OUT} held "
                f"out by hash, {repeats} results per training pair, {NOISE:.0%} of responses "
                f"perturbed; {len(received)} versions through real score and train processes, "
                f"windows of {WINDOW}, CPU.",
                f"The trainer took {params.steps_per_window} AdamW step(s) per window "
                f"(LORASTREAM_STEPS_PER_WINDOW), rehearsing {params.rehearsal} earlier "
                f"event(s) per step (LORASTREAM_REHEARSAL, buffer {params.rehearsal_buffer}), "
                f"lr {lora.learning_rate:g}, targets {','.join(lora.target_modules)}; the "
                f"offline run one step per batch of {WINDOW}, {epochs} epochs on exactly the "
                "windows' events, with the same LoRA settings.",
                f"offline = the mean of {params.shuffles} shuffled runs, as the shuffle order "
                "alone moves it (by up to 40% in issue #11's runs); range after the last "
                f"epoch here: {ranges}.",
                f"offline after 1 epoch ({1 / params.steps_per_window:.2g} times the stream's "
                f"steps): mean {epoch1:.3f}, streamed/that "
                f"{mean['streamed'] / epoch1:.3f}.",
                "Held-out loss: mean cross-entropy per response token on pairs never produced, "
                "each version loaded from its files. Issue #11's goal (within 10% of the "
                "offline run after the same events) is per adapter; the mean row has none.",
                f"picture: {png}",
            ],
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--words", type=int, default=120, help="made-up words per adapter")
    parser.add_argument("--repeats", type=int, default=4, help="results per training pair")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the offline fine-tune")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for versions")
    parser.add_argument(
        "--steps-per-window", type=int, default=1, help="the trainer's AdamW steps per window"
    )
    parser.add_argument(
        "--shuffles", type=int, default=3, help="offline runs, each in its own shuffled order"
    )
    parser.add_argument(
        "--rehearsal", type=int, default=0, help="earlier events mixed into each step"
    )
    parser.add_argument(
        "--rehearsal-buffer", type=int, default=256, help="the rehearsal buffer per adapter"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=TRAINING.learning_rate, help="both runs' rate"
    )
    parser.add_argument(
        "--target-modules", default=TRAINING.target_modules, help="both runs' LoRA targets"
    )
    add_json_option(parser)
    args = parser.parse_args()
    run(
        Params(
            args.words,
            args.repeats,
            args.epochs,
            args.steps_per_window,
            args.timeout,
            args.shuffles,
            args.json,
            args.rehearsal,
            args.rehearsal_buffer,
            args.learning_rate,
            args.target_modules,
        )
    )
