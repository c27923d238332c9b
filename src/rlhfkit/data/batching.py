"""Batching: cutting a step's examples into micro-batches, and the tensors of a batch of
demonstrations (SFT, PPO-ptx)."""

from __future__ import annotations

import torch

from rlhfkit.data.template import Encoded, pad, position_ids

IGNORE = -100  # the label of a token that is not supervised (the prompt, padding)


def split_by_tokens(items: list, lengths: list[int], budget: int) -> list[list]:
    """Cut ``items`` (sorted by length) into consecutive micro-batches whose padded size, count x
    longest, stays within ``budget`` tokens; an item longer than the budget goes alone.

    >>> split_by_tokens(list("abcde"), [1, 2, 3, 4, 9], 8)
    [['a', 'b'], ['c', 'd'], ['e']]
    """
    out, cur, longest = [], [], 0
    for item, n in zip(items, lengths):
        if cur and (len(cur) + 1) * max(longest, n) > budget:
            out.append(cur)
            cur, longest = [], 0
        cur.append(item)
        longest = max(longest, n)
    return out + ([cur] if cur else [])


def length_batches(lengths: list[int], batch_size: int = 0, token_budget: int = 0) -> list[list[int]]:
    """Indices of length-sorted batches: cut by ``token_budget`` padded tokens when it is set (see
    :func:`split_by_tokens`), else ``batch_size`` at a time. A batch then pads to about its own length.

    >>> length_batches([5, 1, 3], batch_size=2), length_batches([5, 1, 3], token_budget=6)
    ([[1, 2], [0]], [[1, 2], [0]])
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    if token_budget:
        return split_by_tokens(order, [lengths[i] for i in order], token_budget)
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def collate(examples: list[Encoded], pad_id: int, packing: bool) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch. Labels are -100 on the prompt and on padding.

    Unpacked: right-padded (B, T_max) with an attention mask. Packed: one row (1, sum T) with
    position ids that restart at 0 for each example and no attention mask, which transformers turns
    into a block-diagonal causal mask, so examples never attend to each other.
    """
    labels = [[IGNORE] * e.prompt_len + e.response_ids for e in examples]
    if packing:
        ids = torch.tensor([[t for e in examples for t in e.input_ids]])
        pos = torch.tensor([[p for e in examples for p in range(len(e.input_ids))]])
        return {"input_ids": ids, "position_ids": pos, "labels": torch.tensor([[t for lab in labels for t in lab]])}
    ids = pad([e.input_ids for e in examples], pad_id, side="right")
    mask = pad([[1] * len(e.input_ids) for e in examples], 0, side="right")
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask),
            "labels": pad(labels, IGNORE, side="right")}
