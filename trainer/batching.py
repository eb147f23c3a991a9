"""Examples as token rows, grouped into micro-batches by a token budget.

A window's examples are tokenised once (:func:`tokenize`); :func:`plan` groups
them so that no micro-batch holds more than ``token_budget`` tokens *padded*
(its rows times its longest row), which is what a forward pass allocates for.
A window that fits is one micro-batch in its own order (so a short window is
computed exactly as one batch). One that does not is sorted longest first and
packed greedily, so that rows of like length share a micro-batch and little
is spent on padding. An example longer than the budget is a micro-batch of
its own: ``max_length`` bounds it.

With length buckets (:func:`bucket_length`), a micro-batch is padded past its
longest row up to the next bucket, so that a compiled or captured step sees a
few shapes, not one per window. The padding is masked out of attention and of
the loss, so it changes no number beyond rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["IGNORE", "MIN_BUCKET", "Row", "bucket_length", "build_batch", "pad", "plan", "tokenize"]

IGNORE = -100
MIN_BUCKET = 64

Row = tuple[list[int], list[int]]
"""An example's prompt token ids and response token ids (eos included)."""


def tokenize(tokenizer: object, examples: Sequence[tuple[str, str]], max_length: int) -> list[Row]:
    """Each example as (prompt ids, response ids + eos), at most ``max_length`` in all.

    Too long an example loses the start of its prompt first, then the end of its
    response, so at least one response token (the eos, for an empty response)
    always remains.
    """
    tok = tokenizer  # a Hugging Face tokenizer
    eos = tok.eos_token_id  # type: ignore[attr-defined]
    bos = tok.bos_token_id  # type: ignore[attr-defined]
    rows: list[Row] = []
    for prompt, response in examples:
        p = ([bos] if bos is not None else []) + tok(prompt, add_special_tokens=False).input_ids  # type: ignore[operator]
        r = [*tok(response, add_special_tokens=False).input_ids, eos]  # type: ignore[operator]
        r = r[: max_length - 1] if len(r) >= max_length else r
        p = p[len(p) - (max_length - len(r)) :] if len(p) + len(r) > max_length else p
        rows.append((p, r))
    return rows


def bucket_length(length: int, max_length: int) -> int:
    """The bucket a row of ``length`` tokens is padded to: the least power of two from
    MIN_BUCKET up that holds it, or ``max_length`` past the last such below it."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return max(length, min(bucket, max_length))


def pad(
    rows: Sequence[Row], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)``, right-padded to the longest row (or to
    ``width``, at least that); labels are -100 on prompt and padding."""
    longest = max(len(p) + len(r) for p, r in rows)
    if width is not None and width < longest:
        raise ValueError(f"pad: width {width} is shorter than the longest row ({longest})")
    width = longest if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(r, dtype=torch.long)
    return ids, mask, labels


def plan(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """The examples' indices per micro-batch, each at most ``token_budget`` tokens padded
    (rows x longest row), but for a lone example longer than the budget."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be at least 1, not {token_budget}")
    if not lengths:
        return []
    if len(lengths) * max(lengths) <= token_budget:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        # Longest first: a batch's longest row is its first.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def build_batch(
    tokenizer: object, examples: Sequence[tuple[str, str]], max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)``: prompt + response + eos, right-padded.

    Labels are -100 on prompt and padding. Too long an example loses the
    start of its prompt first, then the end of its response, so at least one
    response token (the eos, for an empty response) always remains.
    """
    return pad(tokenize(tokenizer, examples, max_length), tokenizer.pad_token_id)  # type: ignore[attr-defined]
