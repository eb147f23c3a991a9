"""What the adapters learned: the loss of every version drawn beside an offline fine-tune
on the same events, and the newest adapters loaded from their announcements alone, with
PEFT, as a serving system would, each with a greedy generation before and after.

torch, transformers, PEFT and matplotlib are imported only inside these steps (and
early, in the background, by :func:`preload`): the demo's first line must appear at once.
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Any

import orjson

from lorastream.demo.data import CHANCE, TASKS, TRAINING, VOCABULARY
from lorastream.demo.run import Run
from schemas import AdapterUpdate

__all__ = ["load", "picture", "preload"]


def picture(run: Run, lines: list[bytes]) -> None:
    """Draw the loss of every version (the file stays after clean-up) and say, per
    adapter, how far it fell and how an offline fine-tune on the same events did."""
    from lorastream.demo.picture import Panel, draw_learning, general_curve, segment_curves

    run.stage(5, "What the adapters learned")
    newest: dict[str, AdapterUpdate] = {}
    series: dict[str, list[AdapterUpdate]] = {}
    for update in sorted(run.updates, key=lambda u: (u.adapter, u.version)):
        series.setdefault(update.adapter, []).append(update)
        newest[update.adapter] = update
    with run.console.status(
        f"an offline fine-tune on the same events ({TRAINING.offline_epochs} epochs), "
        "for comparison…"
    ):
        offline = _offline(run, lines, series)
    panels = []
    for adapter, updates in series.items():
        first = next((u.eval for u in updates if u.eval is not None), None)
        panels.append(
            Panel(
                title=adapter,
                versions=[u.version for u in updates],
                train=[u.train_loss for u in updates],
                held_out=[u.eval.loss if u.eval else None for u in updates],
                base=first.base_loss if first else None,
                offline=offline[adapter][-1] if adapter in offline else None,
                offline_label=f"offline, {TRAINING.offline_epochs} epochs, same events",
                segments=segment_curves(updates),
                general=general_curve(updates)[0],
                general_base=general_curve(updates)[1],
            )
        )
    run.results.mkdir(parents=True, exist_ok=True)
    png = run.results / "loss.png"
    with run.console.status("drawing the loss of every version…"):
        draw_learning(
            png,
            panels,
            f"lorastream demo {run.name}: windows of {TRAINING.window_size} events, "
            f"LoRA r {TRAINING.lora_r}, learning rate {TRAINING.learning_rate:g}",
            "version (one AdamW step per window)",
            chance=CHANCE,
        )
    run.say(f"loss per version: {png}")
    for adapter, updates in series.items():
        below = next((u.version for u in updates if u.train_loss < 2.0), None)
        run.plain(
            f"  {adapter}: {updates[0].train_loss:.2f} → {updates[-1].train_loss:.2f} "
            f"over {len(updates)} versions" + (f" (below 2 from v{below})" if below else "")
        )
        last = newest[adapter]
        if last.eval is not None and adapter in offline:
            epochs = offline[adapter]
            run.plain(
                f"    held-out ({last.eval.events} events): base {last.eval.base_loss:.2f} "
                f"→ v{last.version} {last.eval.loss:.2f}; an offline fine-tune on the same "
                f"{len(updates) * TRAINING.window_size} events: {epochs[0]:.2f} after one "
                f"epoch (as many steps as the stream), {epochs[-1]:.2f} after "
                f"{len(epochs)}"
            )
    run.say(
        f"chance level is ln {VOCABULARY} = {CHANCE:.2f}: the tiny model reads and writes "
        f"bytes ({VOCABULARY} token ids), and a model that knows nothing spreads its bet "
        "evenly over them. The base model is random, so v1 starts there; each version's "
        "train loss is its window's mean cross-entropy per response token, measured just "
        "before its step, and its held-out loss is measured after it on events no window "
        "trained on (here they repeat the trained pairs, so it measures how well they "
        "were learnt; bench/bench_learning.py holds out pairs never seen). The offline "
        f"line: a fresh LoRA trained on the same events, shuffled, "
        f"{TRAINING.offline_epochs} times over."
    )


def _offline(
    run: Run, lines: list[bytes], series: dict[str, list[AdapterUpdate]]
) -> dict[str, list[float]]:
    """Per adapter: the held-out loss (on its newest version's evaluation set) of an
    offline fine-tune on exactly the events its windows trained on, after each epoch."""
    from trainer.config import LoraSettings
    from trainer.evaluation import decode_eval_set
    from trainer.lora import LoraStepper
    from trainer.model import load_base_model
    from trainer.offline import fine_tune, mean_loss
    from trainer.store import EVAL_SET_FILE

    _quiet_transformers()
    import torch

    torch.set_num_threads(1)  # the tiny model's ops take microseconds: see load()
    pairs: dict[str, tuple[str, str]] = {}
    for line in lines:
        with suppress(orjson.JSONDecodeError, KeyError, TypeError):
            doc = orjson.loads(line)
            pairs[doc["id"]] = (doc["prompt"], doc["response"])
    any_update = next(iter(series.values()))[-1]
    base = load_base_model(Path(any_update.base_model), torch.device("cpu"))
    lora = LoraSettings(
        r=TRAINING.lora_r,
        alpha=TRAINING.lora_alpha,
        target_modules=tuple(TRAINING.target_modules.split(",")),
        learning_rate=TRAINING.learning_rate,
    )
    stepper = LoraStepper(base, lora, seed=run.settings.seed)
    losses = {}
    for adapter, updates in series.items():
        eval_file = Path(updates[-1].uri) / EVAL_SET_FILE
        if not eval_file.exists():
            continue
        held = [(e.prompt, e.response) for e in decode_eval_set(eval_file.read_bytes(), "")]
        events = [pairs[i] for u in updates for i in u.window.event_ids]
        states = fine_tune(
            stepper, events, TRAINING.window_size, TRAINING.offline_epochs, f"offline-{adapter}"
        )
        losses[adapter] = [mean_loss(stepper, state, held) for state in states]
    return losses


def load(run: Run) -> None:
    """Load each adapter's newest version from its announcement and show what it learned."""
    run.stage(6, "Load with PEFT, as a serving system would")
    newest: dict[str, AdapterUpdate] = {}
    for update in run.updates:
        if update.version >= newest.get(update.adapter, update).version:
            newest[update.adapter] = update
    run.say(
        "from each adapter's newest announcement alone: "
        "AutoModelForCausalLM.from_pretrained(update.base_model), then "
        "PeftModel.from_pretrained(base, update.uri)"
    )
    with run.console.status("loading torch, transformers and PEFT…"):
        _quiet_transformers()
        import torch

        # The tiny model's ops take microseconds: a second thread only adds contention
        # (a greedy generation took 0.3-1 s with two threads here, 20 ms with one).
        torch.set_num_threads(1)
    for adapter in sorted(newest):
        _load_one(run, newest[adapter], TASKS.get(adapter, []))


def _load_one(run: Run, update: AdapterUpdate, pairs: list[tuple[str, str]]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.batching import IGNORE, build_batch

    # Until every announcement carries a plain path, an older one may still say file://.
    adapter_dir = update.uri.removeprefix("file://")
    base = AutoModelForCausalLM.from_pretrained(update.base_model)
    tokenizer = AutoTokenizer.from_pretrained(update.base_model)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    run.plain(
        f"{update.adapter} v{update.version}: loaded {adapter_dir} "
        f"({lora:,} LoRA parameters) on {update.base_model}"
    )
    if not pairs:
        return
    ids, mask, labels = build_batch(tokenizer, pairs, 512)
    with torch.no_grad():
        tuned = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        with model.disable_adapter():
            plain = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    tokens = int((labels != IGNORE).sum())
    run.plain(
        f"  loss on its {len(pairs)} pairs ({tokens} response tokens): "
        f"base {plain:.2f} → with the adapter {tuned:.2f} (chance {CHANCE:.2f})"
    )
    prompt, response = pairs[0]
    with torch.no_grad():
        after = _greedy(model, tokenizer, prompt, len(response.encode()) + 8)
        with model.disable_adapter():
            before = _greedy(model, tokenizer, prompt, len(response.encode()) + 8)
    verdict = (
        "the trained response, exactly"
        if after == response
        else f"{_common_prefix(after, response)} of {len(response)} characters right"
    )
    run.plain(f"  greedy generation for {prompt!r} (trained on {response!r}):")
    run.plain(f"    base model        {_shown(before)}")
    run.plain(f"    with the adapter  {_shown(after)}   ← {verdict}")


def preload() -> None:
    """Import what the last steps need in a background thread, while the trainer works:
    torch, transformers and PEFT take seconds to import, and the demo only waits meanwhile."""
    import threading

    def load() -> None:
        with suppress(Exception):  # the step that needs a module imports it again, and reports
            import matplotlib.backends.backend_agg  # noqa: F401
            import transformers.models.llama.modeling_llama  # noqa: F401
            from peft import PeftModel  # noqa: F401
            from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    threading.Thread(target=load, name="lorastream-demo-preload", daemon=True).start()


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding of ``prompt`` as the trainer lays a prompt out (``build_batch``)."""
    import torch

    bos = tokenizer.bos_token_id
    ids = ([bos] if bos is not None else []) + tokenizer(prompt, add_special_tokens=False).input_ids
    input_ids = torch.tensor([ids])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


def _shown(text: str, width: int = 48) -> str:
    return repr(text if len(text) <= width else text[:width] + "…")


def _common_prefix(a: str, b: str) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
