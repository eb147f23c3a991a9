"""One LoRA training step per window, through PEFT, with the state carried between windows.

An adapter's whole training state is an :class:`AdapterState`: the LoRA
weights (keyed as in ``adapter_model.safetensors``) and AdamW's moments as
plain named tensors, so it is written as safetensors, never pickled. The
stepper owns one PeftModel over the frozen base; each step loads a state
into it, runs one AdamW step on the whole window (``steps_per_window`` of
them if asked) and returns a new state, leaving the caller's untouched.

The loss is the mean cross-entropy over the *response* tokens of the window
(prompt and padding are masked with -100). The initial LoRA weights depend
only on the seed and the base model, never on an adapter's name; on the CPU
the same state and window give bit-identical results, so crash-resume and
replay reproduce a lineage exactly.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.exceptions import NonFiniteLossError, StepError
from trainer.model import BaseModel

__all__ = ["AdapterState", "LoraSettings", "LoraStepper", "StepResult", "build_batch"]

IGNORE = -100


@dataclass(frozen=True)
class LoraSettings:
    """LoRA and AdamW hyper-parameters.

    The learning rate's default, 2e-3, is high for a full model but usual for
    LoRA with one step per 16 examples: a continual trainer takes few steps,
    and lower rates barely moved the loss on the learnable test task.

    ``steps_per_window`` AdamW steps are taken on each window, each over the
    whole window (the design card's one step by default). More learn more from
    each event, at that many times the step's cost: on the learnable task of
    ``bench/bench_learning.py`` three bring the streamed held-out loss near a
    three-epoch offline fine-tune's on the same events.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    max_length: int = 512
    micro_batch: int = 16
    steps_per_window: int = 1

    def __post_init__(self) -> None:
        checks = {
            "r": self.r >= 1,
            "alpha": self.alpha > 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "target_modules": len(self.target_modules) > 0,
            "learning_rate": math.isfinite(self.learning_rate) and self.learning_rate > 0,
            "weight_decay": self.weight_decay >= 0,
            "max_length": self.max_length >= 2,
            "micro_batch": self.micro_batch >= 1,
            "steps_per_window": self.steps_per_window >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"LoraSettings.{name} = {getattr(self, name)!r} is out of range")


@dataclass(repr=False)
class AdapterState:
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0

    def __repr__(self) -> str:
        # Short on purpose: printing every weight took seconds, and asyncio (3.11) formats
        # the result of a run's main task on its way out.
        size = sum(t.numel() for t in self.weights.values())
        return (
            f"AdapterState({len(self.weights)} LoRA tensors, {size} values, "
            f"{len(self.optimizer)} optimizer tensors, steps={self.steps})"
        )


@dataclass(frozen=True)
class StepResult:
    state: AdapterState
    loss: float
    tokens: int
    seconds: float


def build_batch(
    tokenizer: object, examples: Sequence[tuple[str, str]], max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)``: prompt + response + eos, right-padded.

    Labels are -100 on prompt and padding. Too long an example loses the
    start of its prompt first, then the end of its response, so at least one
    response token (the eos, for an empty response) always remains.
    """
    tok = tokenizer  # a Hugging Face tokenizer
    eos = tok.eos_token_id  # type: ignore[attr-defined]
    pad = tok.pad_token_id  # type: ignore[attr-defined]
    bos = tok.bos_token_id  # type: ignore[attr-defined]
    rows: list[tuple[list[int], list[int]]] = []
    for prompt, response in examples:
        p = ([bos] if bos is not None else []) + tok(prompt, add_special_tokens=False).input_ids  # type: ignore[operator]
        r = [*tok(response, add_special_tokens=False).input_ids, eos]  # type: ignore[operator]
        r = r[: max_length - 1] if len(r) >= max_length else r
        p = p[len(p) - (max_length - len(r)) :] if len(p) + len(r) > max_length else p
        rows.append((p, r))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(r, dtype=torch.long)
    return ids, mask, labels


def _key(parameter_name: str, adapter: str) -> str:
    # PEFT names a parameter "...lora_A.<adapter>.weight" and saves it as "...lora_A.weight".
    return parameter_name.replace(f".{adapter}.", ".")


class LoraStepper:
    """The base model wrapped once in a PeftModel; steps any adapter's state."""

    ADAPTER = "default"

    def __init__(self, base: BaseModel, lora: LoraSettings, seed: int = 0) -> None:
        from peft import LoraConfig, get_peft_model

        self.base = base
        self.lora = lora
        self.seed = seed
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # typed int; PEFT divides it by r
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        # The initial LoRA weights come from this seed alone: the same for every adapter name.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                self.model = get_peft_model(base.model, config, adapter_name=self.ADAPTER)
            except ValueError as exc:
                raise StepError(
                    f"LoRA target_modules {lora.target_modules} match no module of the base model "
                    f"{base.name} (LORASTREAM_LORA_TARGET_MODULES): {exc}"
                ) from exc
        self.params = {
            _key(name, self.ADAPTER): p
            for name, p in self.model.named_parameters()
            if p.requires_grad
        }
        if not self.params:
            raise StepError(
                f"no module of the base model matches target_modules {lora.target_modules}"
            )
        self._initial = {k: p.detach().to("cpu", copy=True) for k, p in self.params.items()}

    def initial_state(self) -> AdapterState:
        return AdapterState(weights={k: t.clone() for k, t in self._initial.items()})

    def _load(self, state: AdapterState) -> None:
        missing = set(self.params) - set(state.weights)
        if missing:
            raise StepError(
                f"the adapter state lacks {len(missing)} LoRA tensors, e.g. {sorted(missing)[0]}"
            )
        with torch.no_grad():
            for key, parameter in self.params.items():
                parameter.copy_(state.weights[key])

    def _optimizer(self, state: AdapterState) -> torch.optim.AdamW:
        optimizer = torch.optim.AdamW(
            list(self.params.values()),
            lr=self.lora.learning_rate,
            weight_decay=self.lora.weight_decay,
            foreach=False,
        )
        for key, parameter in self.params.items():
            if f"{key}.exp_avg" in state.optimizer:
                optimizer.state[parameter] = {
                    "step": state.optimizer[f"{key}.step"].clone(),
                    "exp_avg": state.optimizer[f"{key}.exp_avg"].to(parameter.device, copy=True),
                    "exp_avg_sq": state.optimizer[f"{key}.exp_avg_sq"].to(
                        parameter.device, copy=True
                    ),
                }
        return optimizer

    def step(self, state: AdapterState, examples: Sequence[tuple[str, str]]) -> StepResult:
        """``steps_per_window`` AdamW steps on the window (one by default).

        The loss reported is the first step's: the window's loss under the state it
        started from, on events the adapter has not seen. Raises NonFiniteLossError,
        changing nothing, if any step's loss or weights are not finite.
        """
        if not examples:
            raise StepError("a window needs at least one example")
        started = time.perf_counter()
        self._load(state)
        for parameter in self.params.values():
            parameter.grad = None  # a failed try must not leak its gradients into the next
        optimizer = self._optimizer(state)
        ids, mask, labels = build_batch(self.base.tokenizer, examples, self.lora.max_length)
        tokens = int((labels != IGNORE).sum())
        self.model.train()
        first = 0.0
        for n in range(self.lora.steps_per_window):
            total = self._accumulate(ids, mask, labels, tokens)
            first = total if n == 0 else first
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        new = self._snapshot(optimizer, state.steps + self.lora.steps_per_window)
        if not all(torch.isfinite(t).all() for t in new.weights.values()):
            raise NonFiniteLossError(first / tokens, "the step made the LoRA weights non-finite")
        return StepResult(new, first / tokens, tokens, time.perf_counter() - started)

    def _accumulate(
        self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, tokens: int
    ) -> float:
        """The window's gradients, accumulated micro-batch by micro-batch and weighted by
        response tokens (so that they are the whole window's mean); its summed loss."""
        device = self.base.device
        total = 0.0
        for start in range(0, ids.shape[0], self.lora.micro_batch):
            part = slice(start, start + self.lora.micro_batch)
            part_labels = labels[part].to(device)
            part_tokens = int((part_labels != IGNORE).sum())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = self.model(
                    input_ids=ids[part].to(device),
                    attention_mask=mask[part].to(device),
                    labels=part_labels,
                )
            loss = out.loss.float()
            if not torch.isfinite(loss):
                raise NonFiniteLossError(float(loss.detach()))
            (loss * (part_tokens / tokens)).backward()
            total += float(loss.detach()) * part_tokens
        return total

    def losses(
        self, state: AdapterState | None, examples: Sequence[tuple[str, str]]
    ) -> list[tuple[float, int]]:
        """Per example: the summed cross-entropy over its response tokens and their number,
        with the step's masking, under ``state`` (None: the base model alone, the adapter
        disabled). The mean response-token loss of a set is sum(sums) / sum(tokens).

        Changes nothing that training reads: no gradients, no optimizer, no random
        numbers drawn (the model is in eval mode, so dropout is off), the model's mode
        put back after; every step loads its own state into the LoRA weights first.
        """
        if not examples:
            return []
        if state is not None:
            self._load(state)
        ids, mask, labels = build_batch(self.base.tokenizer, examples, self.lora.max_length)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                if state is not None:
                    return self._loss_sums(ids, mask, labels)
                with self.model.disable_adapter():
                    return self._loss_sums(ids, mask, labels)
        finally:
            self.model.train(was_training)

    def _loss_sums(
        self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> list[tuple[float, int]]:
        device = self.base.device
        out: list[tuple[float, int]] = []
        for start in range(0, ids.shape[0], self.lora.micro_batch):
            part = slice(start, start + self.lora.micro_batch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = self.model(
                    input_ids=ids[part].to(device), attention_mask=mask[part].to(device)
                ).logits
            shifted = labels[part, 1:].to(device)
            each = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                shifted.reshape(-1),
                ignore_index=IGNORE,
                reduction="none",
            ).view(shifted.shape)
            sums = each.sum(dim=1).tolist()
            counts = (shifted != IGNORE).sum(dim=1).tolist()
            out.extend((float(s), int(c)) for s, c in zip(sums, counts, strict=True))
        return out

    def _snapshot(self, optimizer: torch.optim.Optimizer, steps: int) -> AdapterState:
        weights = {k: p.detach().to("cpu", copy=True) for k, p in self.params.items()}
        moments: dict[str, torch.Tensor] = {}
        for key, parameter in self.params.items():
            slot = optimizer.state.get(parameter, {})
            for name in ("step", "exp_avg", "exp_avg_sq"):
                if name in slot:
                    moments[f"{key}.{name}"] = (
                        torch.as_tensor(slot[name]).detach().to("cpu", copy=True)
                    )
        return AdapterState(weights=weights, optimizer=moments, steps=steps)

    def save_peft(self, state: AdapterState, directory: Path) -> None:
        """``adapter_model.safetensors`` + ``adapter_config.json``, as PEFT and vLLM load them.

        PEFT keeps ``target_modules`` as a set and writes it in the set's order,
        which changes with each process's string hashing: the file is rewritten
        with the list sorted, so that the same training gives the same bytes in
        any process (a replay is compared with its lineage file for file).
        """
        self._load(state)
        # Never the base model's own embedding and output weights (PEFT's "auto" writes them
        # when lm_head or the embeddings are targeted): an adapter holds its LoRA tensors.
        self.model.save_pretrained(
            str(directory), safe_serialization=True, save_embedding_layers=False
        )
        config_path = directory / "adapter_config.json"
        config = json.loads(config_path.read_text())
        for key in ("target_modules", "exclude_modules", "modules_to_save"):
            if isinstance(config.get(key), list):
                config[key] = sorted(config[key])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))  # PEFT's own format
