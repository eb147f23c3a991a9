"""Many adapters' windows in one forward and backward over the base model.

A stream with many tenants has many adapters with a full window at once.
Stepping them one at a time pays the step's fixed cost (launches, the autograd
engine, the host) once per adapter; here the rows of N windows go through the
base model together, and only the LoRA deltas differ by row:

* the base GEMM of each targeted layer runs once on the whole batch;
* each row's delta, ``B(A(x)) * alpha / r``, comes from its own adapter's
  weights. Rows are sorted by adapter, so each adapter's rows are one
  contiguous range: on the CPU (and wherever it is off) a loop over the
  ranges; with ``torch._grouped_mm`` (on by default on a CUDA device of SM90
  or later) two grouped matmuls for the layers whose adapters all share one
  shape, the loop for the others;
* each adapter has its own AdamW, over its own tensors, with its own
  learning rate and weight decay; after its step they stay on the device for
  its next one, in the stepper's LRU (``resident_bytes``, one budget shared
  with the single steps'), instead of coming back from the host state;
* the objective is the *sum* over adapters of each one's mean loss over its
  own response tokens. Rows of a causal LM never see one another and the base
  is frozen, so adapter i's gradients come from its rows alone, exactly those
  of its single step: each adapter takes the step it would have taken alone.

Adapters may differ in rank and target modules (a layer's delta is added to
the rows of the adapters that target it). What must agree within a group is
decided by :func:`plan_groups`: no LoRA dropout (its random draws would not be
those of the single step) and the same ``steps_per_window``.

A failure is one adapter's: a non-finite loss or non-finite weights of one
window leave the other adapters' steps as they would have been, and that
window's result is the error (its rows' NaNs never reach another row).

No number of a row depends on another row's numbers, only on the batch's shape
(each row's GEMM outputs, attention, loss and gradients are its own). So a
replay reproduces one adapter's grouped step bit for bit without the others:
it steps its window with *stand-ins* (:func:`stand_in`) in the others' places,
rows of the recorded token counts (:attr:`GroupedStepper.rows`, announced as
the window's ``group``) that go through no LoRA and take no step.

The group runs on a :class:`~trainer.lora.LoraStepper`'s model, with its
PEFT adapter switched off for the pass (its held state stays as it was).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.adapter_state import AdapterState
from trainer.batching import Row, bucket_length, pad, plan, tokenize
from trainer.config import LoraSettings
from trainer.exceptions import NonFiniteLossError, StepError
from trainer.lora import LoraStepper, StepResult

__all__ = ["GroupedStepper", "Member", "grouped_mm_available", "plan_groups", "stand_in"]

_PREFIX = "base_model.model."  # PEFT's saved names start here, then the module's path


@dataclass(frozen=True)
class Member:
    """One adapter's part of a group: its state, its window, its settings; or a stand-in
    for another adapter's rows (``state`` None: see :func:`stand_in`)."""

    state: AdapterState | None
    examples: Sequence[tuple[str, str]]
    lora: LoraSettings
    shape: Sequence[tuple[int, int]] = ()  # a stand-in's rows: (prompt, response) tokens


def stand_in(shape: Sequence[Sequence[int]], lora: LoraSettings) -> Member:
    """A stand-in for an adapter of a recorded group: rows of ``shape``'s (prompt,
    response) token counts, each position the eos token, through no LoRA, taking no step.
    Its rows give the batch the shape of the group's, so the others' rows come out as
    they did in it (the module's doc)."""
    rows = tuple((int(p), int(r)) for p, r in shape)
    if not rows or any(p < 0 or r < 1 for p, r in rows):
        raise StepError(f"a stand-in needs rows of at least one response token, not {rows}")
    return Member(None, (), lora, rows)


def plan_groups(settings: Sequence[LoraSettings], per_step: int) -> list[list[int]]:
    """The indices of ``settings`` in groups of at most ``per_step``, in order of first
    appearance: adapters whose step a group reproduces exactly (no dropout) group with
    others of the same ``steps_per_window``; the others are groups of one."""
    if per_step < 1:
        raise ValueError(f"adapters per step must be at least 1, not {per_step}")
    groups: list[list[int]] = []
    open_by_key: dict[int, list[int]] = {}
    for i, lora in enumerate(settings):
        if lora.dropout > 0 or per_step == 1:
            groups.append([i])
            continue
        group = open_by_key.get(lora.steps_per_window)
        if group is None or len(group) >= per_step:
            group = []
            open_by_key[lora.steps_per_window] = group
            groups.append(group)
        group.append(i)
    return groups


def grouped_mm_available(device: torch.device) -> bool:
    """Whether ``torch._grouped_mm`` runs fast here: a CUDA device of SM90 or later."""
    return (
        hasattr(torch, "_grouped_mm")
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )


@dataclass
class _Adapter:
    """One member's tensors on the device for the pass: its LoRA pairs and its optimizer."""

    weights: dict[str, torch.nn.Parameter]  # keyed as the state's weights
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module path -> A, B, scale
    optimizer: torch.optim.AdamW | None  # None: a stand-in's, which takes no step


class GroupedStepper:
    """Steps groups of adapters on a LoraStepper's base model (see the module's doc)."""

    def __init__(self, stepper: LoraStepper, grouped_mm: bool | None = None) -> None:
        self.stepper = stepper
        self.device = stepper.base.device
        self.grouped_mm = grouped_mm_available(self.device) if grouped_mm is None else grouped_mm
        self._layout: list[tuple[int, int, int]] = []  # (member, first row, end row)
        self._adapters: list[_Adapter] = []
        # The last step's rows per member, as (prompt, response) token counts: its shape.
        self.rows: list[list[tuple[int, int]]] = []

    # ── the members' tensors ────────────────────────────────────────────────

    def _adapter(self, member: Member) -> _Adapter:
        state, lora = member.state, member.lora
        if state is None:
            return _Adapter({}, {}, None)
        resident = self.stepper.take_resident(state)
        if resident is not None and resident.weights.keys() != state.weights.keys():
            resident = None
        if resident is not None:  # on the device since its last step: no copy
            weights = {key: torch.nn.Parameter(t) for key, t in resident.weights.items()}
        else:
            weights = {
                key: torch.nn.Parameter(t.to(self.device, copy=True))
                for key, t in state.weights.items()
            }
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for key, a in weights.items():
            if ".lora_A." not in key:
                continue
            if not key.startswith(_PREFIX):
                raise StepError(f"the adapter state's tensor {key} is not a PEFT LoRA name")
            b = weights.get(key.replace(".lora_A.", ".lora_B."))
            if b is None:
                raise StepError(f"the adapter state has {key} but not its lora_B")
            path = key[len(_PREFIX) : key.index(".lora_A.")]
            pairs[path] = (a, b, lora.alpha / a.shape[0])
        optimizer = torch.optim.AdamW(
            list(weights.values()),
            lr=lora.learning_rate,
            weight_decay=lora.weight_decay,
            foreach=False,
            fused=True if self.device.type == "cuda" else None,
        )  # as LoraStepper's, so that the step is its step
        for key, parameter in weights.items():
            if resident is not None and key in resident.moments:
                optimizer.state[parameter] = resident.moments[key]
            elif f"{key}.exp_avg" in state.optimizer:
                optimizer.state[parameter] = {
                    "step": state.optimizer[f"{key}.step"].clone(),
                    "exp_avg": state.optimizer[f"{key}.exp_avg"].to(self.device, copy=True),
                    "exp_avg_sq": state.optimizer[f"{key}.exp_avg_sq"].to(self.device, copy=True),
                }
        return _Adapter(weights, pairs, optimizer)

    def _base_layer(self, path: str) -> torch.nn.Module:
        """The frozen linear layer at ``path`` (under PEFT's wrapper where it has one)."""
        try:
            module = self.stepper.causal_lm.get_submodule(path)
        except AttributeError as exc:
            raise StepError(f"the base model has no module {path} for a LoRA pair") from exc
        return getattr(module, "base_layer", module)

    # ── the LoRA deltas ─────────────────────────────────────────────────────

    def _hook(self, path: str) -> Callable[..., torch.Tensor]:
        def add_deltas(
            _module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor:
            return self._with_deltas(path, inputs[0], output)

        return add_deltas

    def _with_deltas(self, path: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        ranges = [(start, end, self._adapters[m].pairs.get(path)) for m, start, end in self._layout]
        if self.grouped_mm and _one_shape(ranges):
            return self._grouped(x, output, ranges)  # type: ignore[arg-type]
        parts, done = [], 0
        for start, end, pair in ranges:
            if pair is None:
                continue
            if start > done:
                parts.append(output[done:start])
            a, b, scale = pair
            # PEFT's lora.Linear: base(x) + lora_B(lora_A(dropout(x))) * scaling
            parts.append(output[start:end] + F.linear(F.linear(x[start:end], a), b) * scale)
            done = end
        if not parts:
            return output
        if done < output.shape[0]:
            parts.append(output[done:])
        return torch.cat(parts)

    def _grouped(
        self,
        x: torch.Tensor,
        output: torch.Tensor,
        ranges: list[tuple[int, int, tuple[torch.Tensor, torch.Tensor, float]]],
    ) -> torch.Tensor:
        """Every row's delta in two grouped matmuls: the ranges cover the batch, in order."""
        per_row = x.shape[1] if x.dim() == 3 else 1
        flat = x.reshape(-1, x.shape[-1])
        ends = torch.tensor(
            [end * per_row for _, end, _ in ranges], dtype=torch.int32, device=x.device
        )
        a = torch.stack([pair[0] for _, _, pair in ranges]).to(flat.dtype)  # [G, r, in]
        b = torch.stack([pair[1] for _, _, pair in ranges]).to(flat.dtype)  # [G, out, r]
        hidden = torch._grouped_mm(flat, a.transpose(-2, -1), offs=ends)
        delta = torch._grouped_mm(hidden, b.transpose(-2, -1), offs=ends)
        scales = {pair[2] for _, _, pair in ranges}
        if len(scales) == 1:
            delta = delta * scales.pop()
        else:
            counts = torch.tensor([(e - s) * per_row for s, e, _ in ranges], device=x.device)
            per_token = torch.tensor([p[2] for _, _, p in ranges], device=x.device)
            delta = delta * per_token.repeat_interleave(counts).to(delta.dtype)[:, None]
        return output + delta.reshape(output.shape)

    # ── a group's step ──────────────────────────────────────────────────────

    def _micro_batches(
        self, members: Sequence[Member]
    ) -> tuple[list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]], list[int]]:
        """The group's rows in micro-batches, each sorted by member (one contiguous range
        per member), as (each row's member, input_ids, mask, labels); and each member's
        response tokens."""
        rows: list[Row] = []
        owner: list[int] = []
        eos = self.stepper.base.tokenizer.eos_token_id
        self.rows = []
        for m, member in enumerate(members):
            if member.state is None:
                mine = [([eos] * p, [eos] * r) for p, r in member.shape]
            else:
                tokenizer, limit = self.stepper.base.tokenizer, member.lora.max_length
                mine = tokenize(tokenizer, member.examples, limit)
            rows += mine
            owner += [m] * len(mine)
            self.rows.append([(len(p), len(r)) for p, r in mine])
        tokens = [0] * len(members)
        for (p, r), m in zip(rows, owner, strict=True):
            tokens[m] += len(r) - (not p)  # those a position before them predicts
        budget = min(member.lora.token_budget for member in members)
        lengths = [len(p) + len(r) for p, r in rows]
        if self.stepper.lora.length_buckets:
            lengths = [bucket_length(n, self.stepper.lora.max_length) for n in lengths]
        batches = []
        for indices in plan(lengths, budget):
            indices = sorted(indices, key=lambda i: (owner[i], i))
            width = max(lengths[i] for i in indices)
            ids, mask, labels = pad(
                [rows[i] for i in indices], self.stepper.base.tokenizer.pad_token_id, width
            )
            batches.append(
                ([owner[i] for i in indices], *self.stepper._to_device(ids, mask, labels))
            )
        return batches, tokens

    def step(self, members: Sequence[Member]) -> list[StepResult | StepError | None]:
        """One group's step: per member, in order, its StepResult, or the StepError (a
        NonFiniteLossError) that its window alone raised (None for a stand-in). Each
        result is the one its member would have had from ``LoraStepper.step`` alone
        (within fp32 rounding); its shape is in :attr:`rows`."""
        if not members:
            return []
        if any(not (m.examples if m.state is not None else m.shape) for m in members):
            raise StepError("each window of a group needs at least one example")
        counts = {m.lora.steps_per_window for m in members}
        if len(counts) > 1 or any(m.lora.dropout > 0 for m in members):
            raise StepError(
                "a group's adapters need no LoRA dropout and one steps_per_window "
                f"(got steps_per_window {sorted(counts)}): group them with plan_groups"
            )
        started = time.perf_counter()
        batches, tokens = self._micro_batches(members)
        self._adapters = [self._adapter(m) for m in members]
        scale = torch.ones(len(members)) / torch.tensor(tokens, dtype=torch.float32)
        # A stand-in's loss counts for nothing: its rows only give the batch its shape.
        scale = torch.where(torch.tensor([m.state is None for m in members]), 0.0, scale)
        scale = scale.to(self.device)
        paths = sorted({path for a in self._adapters for path in a.pairs})
        hooks = [self._base_layer(p).register_forward_hook(self._hook(p)) for p in paths]
        failed: dict[int, StepError] = {}
        first: list[float] = [0.0] * len(members)
        try:
            self.stepper._train(True)
            with self.stepper.model.disable_adapter():
                for n in range(counts.pop()):
                    sums = self._pass(batches, scale, len(members))
                    for m, value in enumerate(sums):
                        if m in failed or self._adapters[m].optimizer is None:
                            continue
                        if not math.isfinite(value):
                            failed[m] = NonFiniteLossError(value / tokens[m])
                            continue
                        first[m] = value if n == 0 else first[m]
                        self._adapters[m].optimizer.step()  # type: ignore[union-attr]
                    for adapter in self._adapters:
                        if adapter.optimizer is not None:
                            adapter.optimizer.zero_grad(set_to_none=True)
        finally:
            for hook in hooks:
                hook.remove()
            self._layout = []
        results: list[StepResult | StepError | None] = []
        seconds = time.perf_counter() - started
        for m, (member, adapter) in enumerate(zip(members, self._adapters, strict=True)):
            if member.state is None:
                results.append(None)
                continue
            if m not in failed and not all(
                bool(torch.isfinite(p).all()) for p in adapter.weights.values()
            ):
                failed[m] = NonFiniteLossError(
                    first[m] / tokens[m], "the step made the LoRA weights non-finite"
                )
            if m in failed:
                results.append(failed[m])
                continue
            steps = member.state.steps + member.lora.steps_per_window
            state = self._snapshot(adapter, steps)
            self._keep(state, adapter)
            results.append(StepResult(state, first[m] / tokens[m], tokens[m], seconds))
        self._adapters = []
        return results

    def _pass(
        self,
        batches: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]],
        scale: torch.Tensor,
        members: int,
    ) -> list[float]:
        """Forward and backward over every micro-batch; each member's summed loss."""
        sums = torch.zeros(members, dtype=torch.float64, device=self.device)
        for owners, ids, mask, labels in batches:
            self._layout = _ranges(owners)
            owner = torch.tensor(owners, device=self.device)
            losses, rows = self.stepper._token_losses(ids, mask, labels)
            of_token = owner[rows]
            # Per member: its sum over this micro-batch, divided by its own token count.
            per_member = torch.zeros(members, dtype=losses.dtype, device=self.device)
            per_member = per_member.index_add(0, of_token, losses)
            (per_member * scale).sum().backward()
            sums += per_member.detach().double()
        return sums.tolist()

    def _keep(self, state: AdapterState, adapter: _Adapter) -> None:
        """Keep the tensors that made ``state`` on the device for its next step, within
        the stepper's ``resident_bytes`` (none on the CPU by default)."""
        assert adapter.optimizer is not None
        optimizer = adapter.optimizer
        self.stepper.keep_resident(
            state,
            {key: p.detach() for key, p in adapter.weights.items()},
            {key: optimizer.state[p] for key, p in adapter.weights.items() if p in optimizer.state},
        )

    def _snapshot(self, adapter: _Adapter, steps: int) -> AdapterState:
        weights = {k: p.detach() for k, p in adapter.weights.items()}
        moments: dict[str, torch.Tensor] = {}
        assert adapter.optimizer is not None  # a stand-in's is never snapshotted
        for key, parameter in adapter.weights.items():
            slot = adapter.optimizer.state.get(parameter, {})
            for name in ("step", "exp_avg", "exp_avg_sq"):
                if name in slot:
                    moments[f"{key}.{name}"] = torch.as_tensor(slot[name]).detach()
        copies = self.stepper.host_copies
        if copies is not None:
            return copies.copy(weights, moments, steps)
        return AdapterState(
            weights={k: t.to("cpu", copy=True) for k, t in weights.items()},
            optimizer={k: t.to("cpu", copy=True) for k, t in moments.items()},
            steps=steps,
        )


def _ranges(owners: list[int]) -> list[tuple[int, int, int]]:
    """(member, first row, end row) of each run of one member's rows."""
    out: list[tuple[int, int, int]] = []
    for row, m in enumerate(owners):
        if out and out[-1][0] == m:
            out[-1] = (m, out[-1][1], row + 1)
        else:
            out.append((m, row, row + 1))
    return out


def _one_shape(ranges: Sequence[tuple[int, int, object]]) -> bool:
    """Whether every range has a LoRA pair here, all of one shape (a grouped matmul's)."""
    shapes = {
        (pair[0].shape, pair[1].shape) if isinstance(pair, tuple) else None for _, _, pair in ranges
    }
    return len(shapes) == 1 and None not in shapes
