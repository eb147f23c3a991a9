"""One LoRA training step per window, through PEFT, with the state carried between windows.

An adapter's whole training state is an :class:`AdapterState`
(:mod:`trainer.adapter_state`): the LoRA weights and AdamW's moments as plain
named tensors, so it is written as safetensors, never pickled. The stepper owns one PeftModel over the frozen base; each step loads a state
into it, runs one AdamW step on the whole window (``steps_per_window`` of
them if asked) and returns a new state, leaving the caller's untouched.

The loss is the mean cross-entropy over the *response* tokens of the window
(prompt and padding are masked with -100). The initial LoRA weights depend
only on the seed and the base model, never on an adapter's name; on the CPU
the same state and window give bit-identical results, so crash-resume and
replay reproduce a lineage exactly.

Memory: a window is split into micro-batches of at most ``token_budget``
padded tokens (:mod:`trainer.batching`), whose gradients add up to the whole
window's, and the loss never holds the window's full logits
(:mod:`trainer.loss`). Gradient checkpointing is an option.

Speed: the stepper remembers the state its last step produced, with the
optimizer that produced it. Given that state again (the next window of the
same adapter, the common case), it steps on at once: no copy of the weights
into the model, no new optimizer. On a GPU it also keeps other recently
trained adapters' weights and moments on the device (``resident_bytes``), so
that switching adapters is a copy on the device, not from the CPU. The
arithmetic is the same either way: on the CPU the results are bit for bit
those of loading every state afresh.

The host waits for the device once per AdamW step (the loss and the weights'
finiteness, in one read), not per micro-batch, and the new state comes back
without blocking (:class:`~trainer.adapter_state.HostCopies`, on a GPU): it is
waited for only when it is read.
"""

from __future__ import annotations

import json
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.adapter_state import AdapterState, HostCopies
from trainer.batching import IGNORE, Row, bucket_length, pad, plan, tokenize
from trainer.config import LoraSettings
from trainer.exceptions import NonFiniteLossError, StepError
from trainer.loss import response_token_losses, supports_chunked
from trainer.model import BaseModel

__all__ = ["AdapterState", "LoraStepper", "StepResult"]


@dataclass(frozen=True)
class StepResult:
    state: AdapterState
    loss: float
    tokens: int
    seconds: float


@dataclass
class _Resident:
    """An adapter state's tensors on the device: its weights and AdamW's moments."""

    state: weakref.ref[AdapterState]
    weights: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]]
    size: int


def _compile_layers(causal_lm: torch.nn.Module) -> None:
    """torch.compile each decoder layer in place (one graph serves them all, since they
    share their code), or the whole decoder where it has no ``layers``."""
    decoder = getattr(causal_lm, str(getattr(causal_lm, "base_model_prefix", "")), causal_lm)
    layers = getattr(decoder, "layers", None)
    for module in layers if isinstance(layers, torch.nn.ModuleList) else [decoder]:
        module.compile(dynamic=None)


def _key(parameter_name: str, adapter: str) -> str:
    # PEFT names a parameter "...lora_A.<adapter>.weight" and saves it as "...lora_A.weight".
    return parameter_name.replace(f".{adapter}.", ".")


class LoraStepper:
    """The base model wrapped once in a PeftModel; steps any adapter's state."""

    ADAPTER = "default"

    def __init__(
        self,
        base: BaseModel,
        lora: LoraSettings,
        seed: int = 0,
        *,
        buffered_copy: bool | None = None,
    ) -> None:
        """``buffered_copy``: bring new states to the host through reused buffers without
        blocking (None: on a GPU only; True on the CPU gives the same bytes, for tests)."""
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
        self.causal_lm = self.model.get_base_model()
        self.chunked = supports_chunked(self.causal_lm)
        if lora.gradient_checkpointing:
            self.causal_lm.gradient_checkpointing_enable(  # type: ignore[operator]
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        on_gpu = base.device.type == "cuda"
        self.compiled = bool(lora.compile and on_gpu)
        if self.compiled:
            _compile_layers(self.causal_lm)
        self.resident_bytes = (
            lora.resident_bytes if lora.resident_bytes is not None else 2**30 if on_gpu else 0
        )
        # The state the LoRA parameters hold now, and the optimizer whose moments go with
        # it (None after a load for evaluation or writing: the moments are the state's).
        self._holds: weakref.ref[AdapterState] | None = None
        self._optimizer_of_held: torch.optim.AdamW | None = None
        self._resident: OrderedDict[int, _Resident] = OrderedDict()
        buffered = on_gpu if buffered_copy is None else buffered_copy
        self.host_copies = HostCopies(base.device) if buffered else None

    def initial_state(self) -> AdapterState:
        return AdapterState(weights={k: t.clone() for k, t in self._initial.items()})

    # ── which state the model holds ──────────────────────────────────────────

    def _held(self) -> AdapterState | None:
        return self._holds() if self._holds is not None else None

    def _load(self, state: AdapterState) -> None:
        """Make the LoRA parameters hold ``state``'s weights (no copy if they do)."""
        if self._held() is state:
            return
        missing = set(self.params) - set(state.weights)
        if missing:
            raise StepError(
                f"the adapter state lacks {len(missing)} LoRA tensors, e.g. {sorted(missing)[0]}"
            )
        self._stash()
        resident = self.take_resident(state)
        if resident is not None and resident.weights.keys() != self.params.keys():
            resident = None  # another adapter's targets (a group's, trainer.grouped)
        with torch.no_grad():
            for key, parameter in self.params.items():
                parameter.copy_(resident.weights[key] if resident else state.weights[key])
        self._holds = weakref.ref(state)
        self._optimizer_of_held = None
        if resident is not None:
            self._optimizer_of_held = self._new_optimizer(resident.moments)

    def _stash(self) -> None:
        """Keep the held state's weights and moments on the device before they are
        overwritten, if it is still in use and there is room (``resident_bytes``)."""
        held, optimizer = self._held(), self._optimizer_of_held
        self._holds, self._optimizer_of_held = None, None
        if held is None or optimizer is None or self.resident_bytes <= 0:
            return
        with torch.no_grad():
            weights = {k: p.detach().clone() for k, p in self.params.items()}
        moments = {key: dict(optimizer.state[p]) for key, p in self.params.items()}
        self.keep_resident(held, weights, moments)

    def take_resident(self, state: AdapterState) -> _Resident | None:
        """``state``'s tensors on the device, if they are kept (then no longer: the caller
        steps them in place); None when they are not, and it copies them from ``state``."""
        resident = self._resident.pop(id(state), None)
        if resident is not None and resident.state() is not state:
            return None  # another state at a reused address
        return resident

    def keep_resident(
        self,
        state: AdapterState,
        weights: dict[str, torch.Tensor],
        moments: dict[str, dict[str, torch.Tensor]],
    ) -> None:
        """Keep ``state``'s ``weights`` and ``moments``, on the device, for the next step
        of it, as long as ``state`` is in use and there is room (``resident_bytes``, one
        budget for this stepper's adapter and a group's, trainer.grouped)."""
        if self.resident_bytes <= 0:
            return
        size = sum(t.numel() * t.element_size() for t in weights.values()) + sum(
            t.numel() * t.element_size()
            for slot in moments.values()
            for t in slot.values()
            if isinstance(t, torch.Tensor)
        )
        self._resident[id(state)] = _Resident(weakref.ref(state), weights, moments, size)
        while sum(r.size for r in self._resident.values()) > self.resident_bytes:
            self._resident.popitem(last=False)  # the least recently trained goes

    def _forget(self) -> None:
        """After a failed step: the parameters and moments are half-stepped, hold nothing."""
        self._holds, self._optimizer_of_held = None, None

    def _new_optimizer(self, moments: dict[str, dict[str, torch.Tensor]]) -> torch.optim.AdamW:
        # Fused on a GPU (one kernel for every tensor); on the CPU the per-tensor loop,
        # whose results the determinism tests pin.
        on_gpu = self.base.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            list(self.params.values()),
            lr=self.lora.learning_rate,
            weight_decay=self.lora.weight_decay,
            foreach=False,
            fused=True if on_gpu else None,
        )
        for key, parameter in self.params.items():
            if key in moments:
                optimizer.state[parameter] = moments[key]
        return optimizer

    def _optimizer(self, state: AdapterState) -> torch.optim.AdamW:
        """The optimizer for the held ``state``: the one that made it, or one carrying its
        moments (copied to the device)."""
        if self._optimizer_of_held is not None:
            return self._optimizer_of_held
        moments: dict[str, dict[str, torch.Tensor]] = {}
        for key, parameter in self.params.items():
            if f"{key}.exp_avg" in state.optimizer:
                moments[key] = {
                    "step": state.optimizer[f"{key}.step"].clone(),
                    "exp_avg": state.optimizer[f"{key}.exp_avg"].to(parameter.device, copy=True),
                    "exp_avg_sq": state.optimizer[f"{key}.exp_avg_sq"].to(
                        parameter.device, copy=True
                    ),
                }
        self._optimizer_of_held = self._new_optimizer(moments)
        return self._optimizer_of_held

    # ── a window ─────────────────────────────────────────────────────────────

    def _micro_batches(
        self, examples: Sequence[tuple[str, str]]
    ) -> tuple[list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]], int]:
        """The window as micro-batches of at most ``token_budget`` padded tokens: each is
        (the examples' indices, input_ids, attention_mask, labels); and the response tokens."""
        rows: list[Row] = tokenize(self.base.tokenizer, examples, self.lora.max_length)
        pad_id = self.base.tokenizer.pad_token_id
        lengths = [len(p) + len(r) for p, r in rows]
        buckets = self.lora.length_buckets
        if buckets:  # the budget bounds what is allocated: the bucket, not the row
            lengths = [bucket_length(n, self.lora.max_length) for n in lengths]
        batches = []
        # The tokens a loss is taken on: those that a position before them predicts.
        tokens = 0
        for indices in plan(lengths, self.lora.token_budget):
            width = max(lengths[i] for i in indices) if buckets else None
            ids, mask, labels = pad([rows[i] for i in indices], pad_id, width)
            tokens += sum(len(rows[i][1]) - (not rows[i][0]) for i in indices)
            batches.append((indices, *self._to_device(ids, mask, labels)))
        return batches, tokens

    def _to_device(
        self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On a GPU: through pinned memory, without blocking the host (the kernels that
        read them are queued after the copies)."""
        device = self.base.device
        if device.type != "cuda":
            return ids, mask, labels
        ids, mask, labels = (
            t.pin_memory().to(device, non_blocking=True) for t in (ids, mask, labels)
        )
        return ids, mask, labels

    def _token_losses(
        self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per response token of a micro-batch: its loss (fp32) and its row."""
        device = self.base.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if self.chunked:
                return response_token_losses(
                    self.causal_lm, ids, mask, labels, self.lora.loss_chunk_tokens
                )
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        targets = labels[:, 1:]
        where = targets != IGNORE
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1][where].float(), targets[where], reduction="none"
        )
        return losses, where.nonzero()[:, 0]

    def step(self, state: AdapterState, examples: Sequence[tuple[str, str]]) -> StepResult:
        """``steps_per_window`` AdamW steps on the window (one by default).

        The loss reported is the first step's: the window's loss under the state it
        started from, on events the adapter has not seen. Raises NonFiniteLossError,
        changing nothing, if any step's loss or weights are not finite.
        """
        if not examples:
            raise StepError("a window needs at least one example")
        started = time.perf_counter()
        batches, tokens = self._micro_batches(examples)
        self._load(state)
        optimizer = self._optimizer(state)
        params = list(self.params.values())
        try:
            for parameter in params:
                parameter.grad = None  # a failed try must not leak its gradients into the next
            self._train(True)
            first = 0.0
            for n in range(self.lora.steps_per_window):
                # Summed on the device in float64 (as Python summed the floats before), read
                # once per step: no wait for the device between micro-batches.
                total = torch.zeros((), dtype=torch.float64, device=self.base.device)
                for _, ids, mask, labels in batches:
                    losses, _ = self._token_losses(ids, mask, labels)
                    summed = losses.sum()
                    (summed / tokens).backward()
                    total += summed.detach().double()
                value = float(total)
                if not math.isfinite(value):
                    raise NonFiniteLossError(value / tokens)
                first = value if n == 0 else first
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            # The largest magnitude per tensor (NaN or inf where one is), in one fused call.
            largest = torch._foreach_norm(list[torch.Tensor](params), float("inf"))
            if not bool(torch.isfinite(torch.stack(largest)).all()):
                raise NonFiniteLossError(
                    first / tokens, "the step made the LoRA weights non-finite"
                )
            new = self._snapshot(optimizer, state.steps + self.lora.steps_per_window)
        except BaseException:
            self._train(False)
            self._forget()
            raise
        # The parameters and this optimizer now hold the new state: the next window of this
        # adapter steps on from them. The model stays in training mode for it.
        self._holds = weakref.ref(new)
        self._optimizer_of_held = optimizer
        return StepResult(new, first / tokens, tokens, time.perf_counter() - started)

    def _train(self, training: bool) -> None:
        """Set the model's mode, only if it changes: a PeftModel's ``train()`` walks
        every module of the base, host work a step need not repeat."""
        if self.model.training != training:
            self.model.train(training)

    def losses(
        self, state: AdapterState | None, examples: Sequence[tuple[str, str]]
    ) -> list[tuple[float, int]]:
        """Per example: the summed cross-entropy over its response tokens and their number,
        with the step's masking, under ``state`` (None: the base model alone, the adapter
        disabled). The mean response-token loss of a set is sum(sums) / sum(tokens).

        Changes nothing that training reads: no gradients, no optimizer, no random
        numbers drawn (the model is in eval mode, so dropout is off), the model's mode
        put back after; a step loads its own state (or steps on from this one).
        """
        if not examples:
            return []
        if state is not None:
            self._load(state)
        batches, _ = self._micro_batches(examples)
        out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
        was_training = self.model.training
        self._train(False)
        try:
            # Evaluation runs eager: forward-only and without gradients, it would compile
            # graphs of its own, for little gain.
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                for indices, ids, mask, labels in batches:
                    if state is not None:
                        losses, rows = self._token_losses(ids, mask, labels)
                    else:
                        with self.model.disable_adapter():
                            losses, rows = self._token_losses(ids, mask, labels)
                    sums = torch.zeros(len(indices), dtype=torch.float32, device=losses.device)
                    sums.index_add_(0, rows, losses)
                    counts = torch.bincount(rows, minlength=len(indices))
                    for i, total, count in zip(
                        indices, sums.tolist(), counts.tolist(), strict=True
                    ):
                        out[i] = (float(total), int(count))
        finally:
            self._train(was_training)
        return out

    def _snapshot(self, optimizer: torch.optim.Optimizer, steps: int) -> AdapterState:
        """The parameters and moments as a new state on the host: through the reused
        buffers without blocking where ``host_copies`` is set, else copied at once."""
        weights = {k: p.detach() for k, p in self.params.items()}
        moments: dict[str, torch.Tensor] = {}
        for key, parameter in self.params.items():
            slot = optimizer.state.get(parameter, {})
            for name in ("step", "exp_avg", "exp_avg_sq"):
                if name in slot:
                    moments[f"{key}.{name}"] = torch.as_tensor(slot[name]).detach()
        if self.host_copies is not None:
            return self.host_copies.copy(weights, moments, steps)
        return AdapterState(
            weights={k: t.to("cpu", copy=True) for k, t in weights.items()},
            optimizer={k: t.to("cpu", copy=True) for k, t in moments.items()},
            steps=steps,
        )

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
