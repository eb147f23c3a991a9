"""The cross-entropy of response tokens, without the window's full logits.

A causal LM's own loss computes logits for every position, prompt and padding
included, and upcasts them to fp32: ``[rows x length x vocabulary]`` floats. For
16 examples of 1,500 tokens and a 128k vocabulary that is 11.6 GiB, the whole of
an out-of-memory error on an 80 GB card. Here the decoder runs alone, the hidden
states of the positions that predict a response token are gathered, and the
output layer and the cross-entropy run over them in chunks of ``chunk_tokens``.
With gradients, each chunk is checkpointed (its logits are recomputed in the
backward pass rather than kept), so at most one chunk's logits exist at a time.

Models whose logits are more than the output layer's (a soft cap, a scale) keep
the plain path: :func:`supports_chunked` says which.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.batching import IGNORE

__all__ = ["response_token_losses", "supports_chunked"]

# Config attributes that change logits after the output layer: such models keep the plain path.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
)


def supports_chunked(causal_lm: torch.nn.Module) -> bool:
    """Whether ``causal_lm``'s logits are its output layer applied to its decoder's last
    hidden state, nothing more (Llama, Mistral, Qwen, Phi-3 and their kin)."""
    prefix = getattr(causal_lm, "base_model_prefix", "")
    config = getattr(causal_lm, "config", None)
    if not prefix or not isinstance(getattr(causal_lm, prefix, None), torch.nn.Module):
        return False
    if causal_lm.get_output_embeddings() is None:  # type: ignore[operator]
        return False
    return not any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS)


def _cross_entropy(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def response_token_losses(
    causal_lm: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response token (labels not -100, shifted as a causal LM's loss shifts them):
    its cross-entropy in fp32, and the row it belongs to. ``causal_lm`` is the model under
    any PEFT wrapping (its LoRA layers are injected in place, so they take part)."""
    decoder = getattr(causal_lm, str(causal_lm.base_model_prefix))
    head = causal_lm.get_output_embeddings()  # type: ignore[operator]
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    where = targets != IGNORE
    rows = where.nonzero()[:, 0]
    picked, wanted = hidden[:, :-1][where], targets[where]
    chunks = []
    for start in range(0, picked.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled() and picked.shape[0] > chunk_tokens:
            chunks.append(
                checkpoint(_cross_entropy, head, picked[part], wanted[part], use_reentrant=False)
            )
        else:
            chunks.append(_cross_entropy(head, picked[part], wanted[part]))
    losses = torch.cat(chunks) if chunks else picked.new_zeros(0, dtype=torch.float32)
    return losses, rows
