"""An adapter's training state on the host, and the copy that brings it there from the device.

An :class:`AdapterState` holds the LoRA weights (keyed as in
``adapter_model.safetensors``) and AdamW's moments as plain named CPU tensors, so
it is written as safetensors, never pickled.

After a step on a GPU the new state has to come back to the host. Copying each
tensor with ``.to("cpu")`` blocks on every one of them (hundreds for a 1B
model), so the host idles while the GPU finishes the step and then pays a
synchronisation per tensor. :class:`HostCopies` instead enqueues the copies
into pinned host buffers with ``non_blocking=True``, records a CUDA event, and
returns at once; the state waits for that event only when its tensors are read
(the files written, the state loaded elsewhere). The buffers are preallocated
and reused: a state that is read takes its own tensors out of them (a host
copy, no device sync), and gives them back; one that is never read gives them
back when it is collected. No tensor a caller can hold ever lives in a buffer
that a later step overwrites.

On the CPU the trainer keeps the plain copy (``buffered=False``), whose results
the determinism tests pin; the buffered path can be forced there, where it
gives the same bytes (non-pinned buffers, no event).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch

__all__ = ["AdapterState", "HostCopies"]

Tensors = dict[str, torch.Tensor]


class AdapterState:
    """LoRA weights and AdamW moments, on the host; ``steps`` optimizer steps taken.

    ``weights`` and ``optimizer`` wait for a pending copy from the device before they
    are returned (see :class:`HostCopies`); ``steps`` never waits.
    """

    def __init__(
        self,
        weights: Tensors | None = None,
        optimizer: Tensors | None = None,
        steps: int = 0,
        *,
        pending: _Pending | None = None,
    ) -> None:
        self._weights: Tensors = weights if weights is not None else {}
        self._optimizer: Tensors = optimizer if optimizer is not None else {}
        self.steps = steps
        self._pending = pending

    @property
    def weights(self) -> Tensors:
        self.wait()
        return self._weights

    @property
    def optimizer(self) -> Tensors:
        self.wait()
        return self._optimizer

    @property
    def ready(self) -> bool:
        """Whether the tensors are on the host already (reading them will not wait)."""
        return self._pending is None

    def wait(self) -> None:
        """Finish the copy from the device, if one is pending; then the tensors are ours."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._weights, self._optimizer = pending.take()

    def __repr__(self) -> str:
        # Short on purpose: printing every weight took seconds, and asyncio (3.11) formats
        # the result of a run's main task on its way out. Never waits for a pending copy.
        if self._pending is not None:
            return f"AdapterState(copy from the device pending, steps={self.steps})"
        size = sum(t.numel() for t in self._weights.values())
        return (
            f"AdapterState({len(self._weights)} LoRA tensors, {size} values, "
            f"{len(self._optimizer)} optimizer tensors, steps={self.steps})"
        )


class _Pending:
    """One state's copy in flight: the buffers it was enqueued into and the event after it."""

    def __init__(
        self,
        owner: HostCopies,
        layout: tuple[object, ...],
        buffers: Tensors,
        weight_keys: list[str],
        event: torch.cuda.Event | None,
    ) -> None:
        self.owner, self.layout, self.buffers = owner, layout, buffers
        self.weight_keys, self.event = weight_keys, event
        self.done = False

    def take(self) -> tuple[Tensors, Tensors]:
        """Wait for the copy, clone the values out of the buffers, give the buffers back."""
        if self.event is not None:
            self.event.synchronize()
        weights: Tensors = {}
        optimizer: Tensors = {}
        keys = set(self.weight_keys)
        for name, buffer in self.buffers.items():
            (weights if name in keys else optimizer)[name] = buffer.clone()
        self.release()
        return weights, optimizer

    def release(self) -> None:
        if not self.done:
            self.done = True
            self.owner.give_back(self.layout, self.buffers)


class HostCopies:
    """Reused host buffers into which device tensors are copied without blocking."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._free: dict[tuple[object, ...], list[Tensors]] = {}
        self.allocations = 0  # buffer sets made so far: stays at one per adapter in flight

    def copy(
        self, weights: Mapping[str, torch.Tensor], optimizer: Mapping[str, torch.Tensor], steps: int
    ) -> AdapterState:
        """A state whose tensors are ``weights`` and ``optimizer``'s values now, copied
        into buffers in the order the device runs its work; read, it waits for them."""
        sources = {**weights, **optimizer}
        layout = tuple((k, tuple(t.shape), t.dtype) for k, t in sources.items())
        free = self._free.get(layout)
        buffers = free.pop() if free else self._allocate(sources)
        for name, tensor in sources.items():
            buffers[name].copy_(tensor.detach(), non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        pending = _Pending(self, layout, buffers, list(weights), event)
        state = AdapterState(steps=steps, pending=pending)
        # A state dropped unread gives its buffers back; the device's later copies into
        # them are queued after this one on the same stream, so it cannot be overwritten
        # while still in flight.
        weakref.finalize(state, pending.release)
        return state

    def give_back(self, layout: tuple[object, ...], buffers: Tensors) -> None:
        self._free.setdefault(layout, []).append(buffers)

    def _allocate(self, sources: Mapping[str, torch.Tensor]) -> Tensors:
        self.allocations += 1
        return {
            name: torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.pinned)
            for name, t in sources.items()
        }
