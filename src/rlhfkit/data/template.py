"""Chat templating with an exact token boundary between prompt and response, truncation, and padding.

The boundary is exact by construction: the prompt is rendered with the chat template and the
generation prompt (``<|im_start|>assistant\\n``), the response is tokenized on its own and EOS is
appended. ``prompt_ids + response_ids`` is therefore exactly what the model sees in training, and
exactly the prefix it continues from in generation, for chosen and rejected alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TRUNCATION = ("prompt_left", "right", "drop")


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    text = "\n\n".join(m["content"] for m in messages)
    return text + "\n\n" if generation_prompt else text


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to and including the assistant generation prompt.

    With no chat template (a base model), the turns are joined by blank lines."""
    return tokenizer(_render(tokenizer, messages, True), add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, response: str | list[dict], prompt: list[dict] | None = None) -> list[int]:
    """Token ids of a response, ending in EOS (reference §8 item 15: without it the policy never
    learns to stop).

    A response given as messages (a dialogue that goes on for several turns) is rendered together
    with its prompt and the part after the prompt's rendering is kept, so the boundary stays exact."""
    eos = tokenizer.eos_token_id
    if isinstance(response, str):
        return tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
    if prompt is None:
        raise ValueError("a multi-turn response needs its prompt to be rendered")
    head = _render(tokenizer, prompt, True)
    full = _render(tokenizer, prompt + response, False)
    if not full.startswith(head):
        raise ValueError("the chat template does not render the prompt as a prefix of the dialogue")
    ids = tokenizer(full[len(head):].rstrip(), add_special_tokens=False)["input_ids"]
    return ids if ids and ids[-1] == eos else ids + [eos]


@dataclass
class Encoded:
    """One prompt/response pair as tokens. ``prompt_len`` is the boundary index."""

    input_ids: list[int]
    prompt_len: int
    truncated: bool = False

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.prompt_len:]


def truncate(prompt: list[int], response: list[int], max_length: int, policy: str) -> Encoded | None:
    """Fit a pair into ``max_length`` tokens. Returns None when the policy drops it.

    - ``prompt_left``: cut the oldest prompt tokens, keep the whole response (with its EOS);
      drop the pair when the response alone does not fit beside at least one prompt token.
    - ``right``: cut the end of the sequence (the response may lose its EOS); drop the pair when
      the prompt alone fills ``max_length``.
    - ``drop``: drop every pair that does not fit.
    """
    if policy not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {policy!r}")
    if len(prompt) + len(response) <= max_length:
        return Encoded(prompt + response, len(prompt))
    if policy == "prompt_left" and len(response) < max_length:
        keep = max_length - len(response)
        return Encoded(prompt[-keep:] + response, keep, truncated=True)
    if policy == "right" and len(prompt) < max_length:
        return Encoded((prompt + response)[:max_length], len(prompt), truncated=True)
    return None


def pad(seqs: list[list[int]], value: int, side: str) -> torch.Tensor:
    """Stack variable-length sequences into (B, T_max), padding on ``side`` ("left" or "right").
    The side is always explicit: generation wants left, training wants right (reference §1d)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            if side == "right":
                out[i, : len(s)] = torch.as_tensor(s)
            else:
                out[i, width - len(s):] = torch.as_tensor(s)
    return out


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding: ``cumsum(mask) - 1`` clamped at 0 (reference §1a item 3), so the
    logits at real tokens do not depend on how much padding precedes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_examples(tokenizer, pairs, max_length: int, policy: str) -> tuple[list[Encoded], dict]:
    """Encode (prompt messages, response) pairs with the truncation policy.

    Returns the kept examples and a report: how many were truncated or dropped (with the first few
    sources), so no data disappears unreported."""
    kept, report = [], {"total": 0, "truncated": 0, "dropped": 0, "dropped_examples": []}
    for prompt, response, source in pairs:
        report["total"] += 1
        enc = truncate(encode_prompt(tokenizer, prompt), encode_response(tokenizer, response, prompt),
                       max_length, policy)
        if enc is None:
            report["dropped"] += 1
            if len(report["dropped_examples"]) < 5:
                report["dropped_examples"].append(source)
            continue
        report["truncated"] += enc.truncated
        kept.append(enc)
    return kept, report
