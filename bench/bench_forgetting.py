"""Does an adapter forget when its traffic drifts? The forgetting matrix of GEM (issue #23).

One adapter's stream moves through three learnable tasks, A -> B -> C: the
rules of ``bench/bench_learning.py`` (``reverse``, ``shout``, ``greet``) on
made-up words, one pair in ten held out by a hash of its id and never trained.
Each task's events (every training pair ``--repeats`` times, shuffled by the
seed, a tenth perturbed) are a stretch of the stream, cut to whole windows of
16. They go, in process and without Kafka, through the live trainer's own
core: :class:`trainer.window.Windows` closes the windows,
:class:`trainer.core.WindowTrainer` trains and writes each version, a
:class:`trainer.lineage.Lineage` records it, as the live loop does.

After every version the bench measures the adapter on each task's held-out
pairs (mean cross-entropy per response token, the stepper's ``losses``).
R[i][j] is the loss on task j after the last version of task i; ACC is the
mean of the last row; BWT = mean over j < T of (R[j][j] - R[T][j]): negative
means forgetting (GEM's sign, with performance = -loss), also given as a share
of the offline reference's loss on those tasks. The offline reference trains a
fresh LoRA with the demo's settings on all the events, shuffled (multi-task), in
batches of 16 for ``--epochs`` epochs (:func:`trainer.offline.fine_tune`): one
fixed reference for every configuration, so that a configuration cannot look
better by making the offline run worse.

Configurations: one AdamW step per window; K steps per window; rehearsal (each
step also trains on k events sampled from the adapter's earlier ones) at two
sizes; and the candidate issue #23's sweep chose (``bench/sweep_defaults.py``);
each with the demo's LoRA settings unless a configuration says other.
Compute per version is counted from what the trainer wrote: optimizer steps
and response tokens stepped on (the batch's tokens times its steps). Every
figure is the mean over ``--seeds`` seeds (the seed orders and perturbs the
events and sets the trainer's seed). Draws the held-out loss per task and
version for each configuration (``$LORASTREAM_HOME/bench/forgetting-<time>.png``).

    .venv/bin/python bench/bench_forgetting.py [--seeds 3] [--repeats 3] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
from aiokafka import TopicPartition

from bench.bench_learning import HOLD_OUT, NOISE, RULES, WINDOW, _held_out, _perturb, _words
from bench.report import Row, add_json_option, write_json
from lorastream.demo.data import TRAINING
from lorastream.dev.events import learning_event
from lorastream.settings import default_home
from schemas import LearningEvent
from trainer.config import LoraSettings, TrainingConfig
from trainer.core import Trained, WindowTrainer
from trainer.lineage import Lineage
from trainer.lora import LoraStepper
from trainer.model import build_tiny_model_dir, load_base_model
from trainer.offline import fine_tune, mean_loss
from trainer.window import Windows

TASKS = ("reverse", "shout", "greet")  # A, B, C
LABELS = "ABC"
ADAPTER = "drift"
TP = TopicPartition("learning-events", 0)
DATA_SEED = 23
BWT_GOAL = -0.02  # BWT no worse than -2% of the offline reference's loss
LOSS_GOAL = 1.0  # final held-out loss at most the offline reference's
COMPUTE_GOAL = 3.0  # ... at most 3x the compute of one step per window


@dataclass(frozen=True)
class Config:
    """One way of training the stream; the LoRA settings default to the demo's."""

    name: str
    steps: int = 1
    rehearsal: int = 0
    buffer: int = 256
    learning_rate: float = TRAINING.learning_rate
    targets: str = TRAINING.target_modules

    def lora(self, steps: int | None = None) -> LoraSettings:
        return LoraSettings(
            r=TRAINING.lora_r,
            alpha=TRAINING.lora_alpha,
            dropout=0.0,
            target_modules=tuple(self.targets.split(",")),
            learning_rate=self.learning_rate,
            steps_per_window=self.steps if steps is None else steps,
        )


CONFIGS = [
    Config("1 step/window"),
    Config("2 steps/window", steps=2),
    Config("3 steps/window", steps=3),
    Config("rehearsal 16 (buffer 256)", rehearsal=16),
    Config("rehearsal 32 (buffer 256)", rehearsal=32),
    # The candidate that issue #23's sweep (bench/sweep_defaults.py) chose.
    Config("2 steps + rehearsal 8, lr 2e-3", steps=2, rehearsal=8, learning_rate=2e-3),
]


@dataclass(frozen=True)
class Data:
    """The stream (task by task, whole windows) and each task's held-out pairs."""

    events: list[LearningEvent]
    task_of_window: list[int]
    held_out: list[list[tuple[str, str]]]


@dataclass
class Run:
    """One configuration on one seed: per version the held-out loss per task and its cost."""

    losses: list[list[float]] = field(default_factory=list)  # [version][task]
    steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # response tokens stepped on
    rehearsed: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # core.train, files included
    boundaries: list[int] = field(default_factory=list)  # index of each task's last version

    @property
    def matrix(self) -> list[list[float]]:
        return [self.losses[b] for b in self.boundaries]


def rehearsal_available() -> bool:
    """Whether this tree's trainer has rehearsal (TrainingConfig.rehearsal)."""
    return "rehearsal" in {f.name for f in dataclasses.fields(TrainingConfig)}


def make_data(seed: int, words: int, repeats: int) -> Data:
    """Per task its pairs split by hash; the training pairs ``repeats`` times, shuffled by
    ``seed``, a tenth perturbed, cut to whole windows; the tasks one after the other."""
    vocabulary = _words(words, random.Random(DATA_SEED))
    rng = random.Random(f"forgetting-{seed}")
    events: list[LearningEvent] = []
    task_of_window: list[int] = []
    held: list[list[tuple[str, str]]] = []
    for t, task in enumerate(TASKS):
        prompt_of, response_of = RULES[task]
        pairs = [(w, prompt_of(w), response_of(w)) for w in vocabulary]
        held.append([(p, r) for w, p, r in pairs if _held_out(f"{task}-{w}")])
        produced = [
            (n, x) for x in pairs if not _held_out(f"{task}-{x[0]}") for n in range(repeats)
        ]
        rng.shuffle(produced)
        produced = produced[: len(produced) // WINDOW * WINDOW]
        for n, (word, prompt, response) in produced:
            said = _perturb(response, rng) if rng.random() < NOISE else response
            events.append(_event(f"{task}-{word}-{n}", prompt, said, task, len(events)))
        task_of_window += [t] * (len(produced) // WINDOW)
    return Data(events, task_of_window, held)


def _event(event_id: str, prompt: str, response: str, task: str, offset: int) -> LearningEvent:
    return learning_event(
        ADAPTER, offset, event_id=event_id, pair=(prompt, response), metadata={"segment": task}
    )


def training_config(config: Config, seed: int, model: Path, adapters: Path) -> TrainingConfig:
    """The trainer's configuration for ``config``: the live trainer's, evaluation off (the
    bench measures its own held-out pairs)."""
    more: dict[str, Any] = {}
    if config.rehearsal:
        more = {"rehearsal": config.rehearsal, "rehearsal_buffer": config.buffer}
    return TrainingConfig(
        adapter_dir=adapters,
        base_model=model,
        base_model_name="tiny",
        window_size=WINDOW,
        seed=seed,
        device="cpu",
        lora=config.lora(),
        **more,
    )


def stream(
    config: TrainingConfig,
    events: list[LearningEvent],
    measure: list[list[tuple[str, str]]],
    task_of_window: list[int] | None = None,
) -> Run:
    """The live loop without Kafka (as tests/trainer/test_eval.py drives it): each closed
    window trained by the core and recorded in the lineage, then the new version measured
    on every set in ``measure``."""
    core = WindowTrainer.load(config)
    windows, lineage, run = Windows(config.window_size), Lineage(events[0].adapter), Run()
    for offset, event in enumerate(events):
        _, closed = windows.offer(TP, offset, event, lineage)
        if closed is None:
            continue
        started = time.perf_counter()
        outcome = core.train(closed, lineage)
        run.seconds.append(time.perf_counter() - started)
        if not isinstance(outcome, Trained):
            raise RuntimeError(f"{closed} was quarantined: {outcome.error}")
        lineage.record(outcome.update)
        windows.settle(closed)
        metadata = orjson.loads((Path(outcome.update.uri) / "lorastream.json").read_bytes())
        run.steps.append(config.lora.steps_per_window)
        run.tokens.append(int(metadata["tokens"]) * config.lora.steps_per_window)
        rehearsal = getattr(outcome.update, "rehearsal", None)
        run.rehearsed.append(rehearsal.events if rehearsal is not None else 0)
        run.losses.append([mean_loss(core.stepper, outcome.state, pairs) for pairs in measure])
    if task_of_window is not None:
        run.boundaries = [
            max(i for i, t in enumerate(task_of_window) if t == task)
            for task in sorted(set(task_of_window))
        ]
    return run


def offline(
    config: Config, seed: int, model: Path, data: Data, epochs: int
) -> tuple[list[float], int]:
    """The multi-task reference: a fresh LoRA on all the stream's events, shuffled, one
    step per batch of 16; its held-out loss per task after ``epochs``, and its steps."""
    import torch

    stepper = LoraStepper(load_base_model(model, torch.device("cpu")), config.lora(1), seed)
    examples = [(e.prompt, e.response) for e in data.events]
    state = fine_tune(stepper, examples, WINDOW, epochs, f"offline-{seed}")[-1]
    return [mean_loss(stepper, state, pairs) for pairs in data.held_out], state.steps


@dataclass(frozen=True)
class Summary:
    """A configuration's figures, the means over its seeds."""

    name: str
    matrix: list[list[float]]
    acc: float
    bwt: float
    bwt_share: float  # BWT / the offline loss on tasks A and B
    ratio: float  # ACC / the offline ACC
    steps: float  # per version
    tokens: float  # per version
    rehearsed: float  # per version
    seconds: float  # per version
    curves: list[list[float]]  # [version][task]
    boundaries: list[int]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def forgetting(matrix: list[list[float]]) -> tuple[float, float]:
    """ACC (mean of the last row) and BWT (mean over j < T of R[j][j] - R[T][j])."""
    last = len(matrix) - 1
    bwt = _mean([matrix[j][j] - matrix[last][j] for j in range(last)])
    return _mean(matrix[last]), bwt


def summarize(name: str, runs: list[Run], reference: list[float]) -> Summary:
    """The mean over seeds of each run's R, ACC, BWT and cost, against ``reference`` (the
    offline loss per task, the mean over the same seeds)."""
    size = len(runs[0].matrix)
    matrix = [[_mean([r.matrix[i][j] for r in runs]) for j in range(size)] for i in range(size)]
    per_seed = [forgetting(r.matrix) for r in runs]
    acc, bwt = _mean([a for a, _ in per_seed]), _mean([b for _, b in per_seed])
    earlier = _mean(reference[: size - 1])
    versions = len(runs[0].losses)
    curves = [[_mean([r.losses[v][t] for r in runs]) for t in range(size)] for v in range(versions)]
    return Summary(
        name=name,
        matrix=matrix,
        acc=acc,
        bwt=bwt,
        bwt_share=bwt / earlier,
        ratio=acc / _mean(reference),
        steps=_mean([_mean([float(s) for s in r.steps]) for r in runs]),
        tokens=_mean([_mean([float(t) for t in r.tokens]) for r in runs]),
        rehearsed=_mean([_mean([float(n) for n in r.rehearsed]) for r in runs]),
        seconds=_mean([_mean(r.seconds) for r in runs]),
        curves=curves,
        boundaries=runs[0].boundaries,
    )


def measure(
    configs: list[Config], seeds: int, words: int, repeats: int, epochs: int, model: Path
) -> tuple[list[Summary], list[float], float, float]:
    """Every configuration on every seed, and the offline reference per seed: the
    summaries, the offline loss per task, its ACC and its steps per stream version."""
    datas = [make_data(seed, words, repeats) for seed in range(seeds)]
    references = [offline(configs[0], seed, model, datas[seed], epochs) for seed in range(seeds)]
    reference = [_mean([r[0][t] for r in references]) for t in range(len(TASKS))]
    offline_steps = _mean([float(s) for _, s in references]) / len(datas[0].task_of_window)
    summaries = []
    for config in configs:
        runs = []
        for seed, data in enumerate(datas):
            adapters = Path(tempfile.mkdtemp(prefix="bench-forgetting-"))
            try:
                setup = training_config(config, seed, model, adapters)
                runs.append(stream(setup, data.events, data.held_out, data.task_of_window))
            finally:
                shutil.rmtree(adapters, ignore_errors=True)
        summaries.append(summarize(config.name, runs, reference))
        print(f"  {config.name}: {len(runs)} seeds done", flush=True)
    return summaries, reference, _mean(reference), offline_steps


def _matrix_text(matrix: list[list[float]]) -> str:
    return " / ".join(" ".join(f"{x:.3f}" for x in row) for row in matrix)


def print_table(summaries: list[Summary], reference: list[float], offline_acc: float) -> None:
    one = summaries[0]
    print(
        f"\n  {'configuration':<31} {'steps/v':>7} {'tokens/v':>8} {'compute':>7} "
        f"{'s/v':>6} {'ACC':>6} {'x off':>6} {'BWT':>7} {'BWT %':>6}   R (rows: after A, B, C)"
    )
    for s in summaries:
        print(
            f"  {s.name:<31} {s.steps:>7.1f} {s.tokens:>8.0f} {s.tokens / one.tokens:>6.2f}x "
            f"{s.seconds:>6.3f} {s.acc:>6.3f} {s.ratio:>6.3f} {s.bwt:>+7.3f} "
            f"{100 * s.bwt_share:>+5.1f}%   {_matrix_text(s.matrix)}"
        )
    print(
        f"  {'offline (multi-task)':<31} {'':>7} {'':>8} {'':>7} {'':>6} {offline_acc:>6.3f} "
        f"{1.0:>6.3f} {'':>7} {'':>6}   per task " + " ".join(f"{x:.3f}" for x in reference)
    )


def draw(png: Path, summaries: list[Summary], reference: list[float], title: str) -> None:
    """One panel per configuration: the held-out loss of each task after each version,
    the task boundaries dotted, the offline reference per task dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(summaries), 3.8), dpi=100)
    FigureCanvasAgg(figure)
    for i, s in enumerate(summaries, 1):
        axes = figure.add_subplot(1, len(summaries), i, sharey=figure.axes[0] if i > 1 else None)
        versions = list(range(1, len(s.curves) + 1))
        for t, label in enumerate(LABELS):
            line = axes.plot(versions, [c[t] for c in s.curves], label=f"task {label}")[0]
            axes.axhline(reference[t], color=line.get_color(), linestyle="--", linewidth=1)
        for b in s.boundaries[:-1]:
            axes.axvline(b + 1.5, color="grey", linestyle=":", linewidth=1)
        axes.set_title(f"{s.name}\nACC {s.acc:.3f}, BWT {s.bwt:+.3f}", fontsize=9)
        axes.set_xlabel("version")
        axes.grid(alpha=0.3)
    figure.axes[0].set_ylabel("held-out loss, nats per response token")
    figure.axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)


def _rows(summaries: list[Summary], offline_acc: float) -> list[Row]:
    one = summaries[0]
    rows = []
    for s in summaries:
        compute = s.tokens / one.tokens
        rows.append(
            Row(
                f"{s.name}: ACC (final held-out loss, mean of A, B, C)",
                f"{s.acc:.3f} nats/token ({s.ratio:.3f}x offline) at {compute:.2f}x compute "
                f"({s.steps:g} steps, {s.tokens:.0f} tokens per version)",
                goal=f"<= {LOSS_GOAL:g}x offline at <= {COMPUTE_GOAL:g}x compute",
                reference=f"{offline_acc:.3f} nats/token (offline, multi-task)",
                met=s.ratio <= LOSS_GOAL and compute <= COMPUTE_GOAL,
            )
        )
        rows.append(
            Row(
                f"{s.name}: BWT on A and B after C",
                f"{s.bwt:+.3f} nats/token ({100 * s.bwt_share:+.1f}% of offline); "
                f"R {_matrix_text(s.matrix)}",
                goal=f">= {100 * BWT_GOAL:+.0f}% of the offline loss",
                reference="R[i][j]: loss on task j after task i",
                met=s.bwt_share >= BWT_GOAL,
            )
        )
    return rows


def _versus(summaries: list[Summary]) -> list[str]:
    """Each rehearsal configuration against the K-steps one nearest in compute."""
    plain = [s for s in summaries if "rehearsal" not in s.name]
    lines = []
    for s in summaries:
        if "rehearsal" not in s.name or not plain:
            continue
        k = min(plain, key=lambda p: abs(p.tokens - s.tokens))
        lines.append(
            f"{s.name} ({s.tokens / summaries[0].tokens:.2f}x compute) against {k.name} "
            f"({k.tokens / summaries[0].tokens:.2f}x): ACC {s.acc:.3f} vs {k.acc:.3f}, "
            f"BWT {s.bwt:+.3f} vs {k.bwt:+.3f}."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
    parser.add_argument("--words", type=int, default=120, help="made-up words per task")
    parser.add_argument("--repeats", type=int, default=3, help="events per training pair")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the offline reference")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 40 words")
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.words, args.repeats = 1, 40, 2
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)  # the tiny model's ops are microseconds; threads only contend
    started = time.perf_counter()
    configs = [c for c in CONFIGS if not c.rehearsal or rehearsal_available()]
    skipped = [c.name for c in CONFIGS if c not in configs]
    model_root = Path(tempfile.mkdtemp(prefix="bench-forgetting-model-"))
    try:
        model = build_tiny_model_dir(model_root / "tiny")
        data = make_data(0, args.words, args.repeats)
        print(
            f"stream: tasks {', '.join(f'{LABELS[i]} {t}' for i, t in enumerate(TASKS))}, "
            f"{args.words} made-up words each, one pair in {HOLD_OUT} held out "
            f"({', '.join(str(len(h)) for h in data.held_out)} pairs); {args.repeats} events per "
            f"training pair, {NOISE:.0%} perturbed; "
            f"{len(data.task_of_window)} windows of {WINDOW} "
            f"({', '.join(str(data.task_of_window.count(t)) for t in range(3))} per task); "
            f"LoRA r {TRAINING.lora_r}, alpha {TRAINING.lora_alpha}, lr {TRAINING.learning_rate:g}, "
            f"targets {TRAINING.target_modules}; {args.seeds} seeds"
        )
        if skipped:
            print(f"skipped (no rehearsal in this tree's trainer): {', '.join(skipped)}")
        summaries, reference, offline_acc, offline_steps = measure(
            configs, args.seeds, args.words, args.repeats, args.epochs, model
        )
    finally:
        shutil.rmtree(model_root, ignore_errors=True)
    print_table(summaries, reference, offline_acc)
    print(
        f"  offline: {args.epochs} epochs over all events shuffled, {offline_steps:.1f} steps per "
        f"stream version; compute = tokens stepped on per version, against 1 step/window"
    )
    for line in _versus(summaries):
        print(f"  {line}")
    png = default_home() / "bench" / f"forgetting-{datetime.now(UTC):%Y%m%d-%H%M%S}.png"
    title = (
        f"held-out loss per task, stream A -> B -> C in windows of {WINDOW} "
        f"(mean of {args.seeds} seeds; dashed: offline multi-task)"
    )
    draw(png, summaries, reference, title)
    seconds = time.perf_counter() - started
    print(f"picture: {png}\n({seconds:.0f} s)")
    if args.json is not None:
        write_json(
            args.json,
            "Forgetting under drift: R, ACC and BWT through tasks A -> B -> C (#23)",
            _rows(summaries, offline_acc),
            [
                f"One adapter, tasks A {TASKS[0]}, B {TASKS[1]}, C {TASKS[2]} (bench_learning's "
                f"rules) in that order, {len(data.task_of_window)} windows of {WINDOW}, through "
                "the trainer's core in process (trainer.core.WindowTrainer, no Kafka), CPU, the "
                f"built-in model, the demo's LoRA (r {TRAINING.lora_r}, alpha "
                f"{TRAINING.lora_alpha}, lr {TRAINING.learning_rate:g}, "
                f"{TRAINING.target_modules}); means over {args.seeds} seeds.",
                "R[i][j] = held-out loss on task j after the last version of task i; ACC = mean "
                "of the last row; BWT = mean over j < T of R[j][j] - R[T][j] (negative: "
                "forgetting), in % of the offline loss on A and B.",
                f"Offline reference: a fresh LoRA, the demo's settings, all events shuffled "
                f"(multi-task), {args.epochs} epochs, one step per batch of {WINDOW}: per task "
                + ", ".join(f"{LABELS[t]} {x:.3f}" for t, x in enumerate(reference))
                + f"; {offline_steps:.1f} steps per stream version.",
                "Compute = response tokens stepped on per version (the batch's tokens, "
                "rehearsed ones included, times its steps), against 1 step/window.",
                *(
                    [f"Not run (no rehearsal in this tree): {', '.join(skipped)}."]
                    if skipped
                    else []
                ),
                *_versus(summaries),
                f"picture: {png}",
            ],
        )


if __name__ == "__main__":
    main()
