"""Reward-model and DPO inputs: a prompt and its responses as token ids (a *group*), and one forward
pass of a reward model over groups. ``rm train``, ``rm eval`` and ``dpo`` all encode their records
this way, so the prompt/response boundary and the truncation are the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhfkit.data.batching import length_batches
from rlhfkit.data.template import encode_prompt, encode_response, pad
from rlhfkit.errors import ConfigError
from rlhfkit.models.reward import last_token_index, pack_shared_prefix

# the record kind each reward-model kind reads
RECORD_KIND = {"pairwise": "preference", "ranking": "ranking", "rating": "rating", "orm": "steps", "prm": "steps"}


def step_label_class(label: int | None) -> int:
    """Step label -1/0/+1 (None: unlabelled) -> class index 0/1/2 (-100: ignored)."""
    return -100 if label is None else int(label) + 1


@dataclass
class Group:
    """One prompt and its responses as tokens, with the kind's targets."""

    prompt: list[int]
    responses: list[list[int]]
    target: float | None = None  # margin (pairwise) or rating
    targets: list[float] = field(default_factory=list)  # orm: correctness of each response
    step_ends: list[int] = field(default_factory=list)  # prm: index in the response of each step's last token
    step_labels: list[int] = field(default_factory=list)  # prm: class per step (-100: unlabelled)
    source: str = ""
    subset: str | None = None
    truncated_responses: bool = False
    prompt_tokens: int = 0  # before truncation


# ---------------------------------------------------------------------------------------------
# records -> groups


def encode_steps(tokenizer, steps: list[str]) -> tuple[list[int], list[int]]:
    """Tokens of a step-by-step solution (steps joined by newlines, EOS at the end) and the index of
    each step's last token. Each step is tokenised on its own, so the boundaries are exact."""
    ids, ends = [], []
    for i, step in enumerate(steps):
        piece = tokenizer(step + ("\n" if i < len(steps) - 1 else ""), add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        ends.append(len(ids) - 1)
    return ids + [tokenizer.eos_token_id], ends


def to_group(record, kind: str, tokenizer) -> Group:
    """Encode one record."""
    prompt = encode_prompt(tokenizer, record.prompt)
    g = Group(prompt=prompt, responses=[], source=record.source, subset=record.subset, prompt_tokens=len(prompt))
    if kind == "pairwise":
        g.responses = [encode_response(tokenizer, r, record.prompt) for r in (record.chosen, record.rejected)]
        g.target = record.margin
    elif kind == "ranking":
        g.responses = [encode_response(tokenizer, r, record.prompt) for r in record.responses]
    elif kind == "rating":
        g.responses = [encode_response(tokenizer, record.response, record.prompt)]
        g.target = record.rating
    else:
        ids, ends = encode_steps(tokenizer, record.steps)
        g.responses = [ids]
        g.targets = [] if record.correct is None else [float(record.correct)]
        g.step_ends, g.step_labels = ends, [step_label_class(x) for x in record.labels]
    return g


MIN_PROMPT = 16


def fit(g: Group, max_length: int) -> Group:
    """Truncation for reward modelling: the prompt loses its oldest tokens so the longest response
    fits; a response that alone leaves fewer than 16 prompt tokens is cut at its end (its score is
    then read at the cut, and ``truncated_responses`` counts it). Nothing is dropped."""
    cap = max_length - MIN_PROMPT
    if any(len(r) > cap for r in g.responses):
        g.responses = [r[:cap] for r in g.responses]
        g.truncated_responses = True
        g.step_ends = [e for e in g.step_ends if e < cap]
        g.step_labels = g.step_labels[: len(g.step_ends)]
    g.prompt = g.prompt[-(max_length - max(len(r) for r in g.responses)):]
    return g


def merge_same_prompt(groups: list[Group]) -> list[Group]:
    """One group per distinct prompt, its solutions (and their labels) in record order: an outcome
    RM's solutions to one question then share the question's forward pass and the ranking term."""
    by_prompt: dict[tuple, Group] = {}
    for g in groups:
        first = by_prompt.setdefault(tuple(g.prompt), g)
        if first is not g:
            first.responses = first.responses + g.responses
            first.targets = first.targets + g.targets
    return list(by_prompt.values())


def encode_groups(records, kind: str, tokenizer, max_length: int, merge: bool = False) -> tuple[list[Group], dict]:
    """Records of a kind -> groups fitted into ``max_length`` tokens (see :func:`fit`), with a
    truncation report. ``merge`` (orm): records with the same prompt become one group."""
    groups = [to_group(r, kind, tokenizer) for r in records]
    if kind == "orm":
        missing = next((r for r, g in zip(records, groups) if not g.targets), None)
        if missing is not None:
            raise ConfigError(f"{missing.source}: field 'correct': an outcome RM needs a correctness label")
        if merge:
            groups = merge_same_prompt(groups)
    report = {"total": len(records), "truncated_prompts": 0, "truncated_responses": 0}
    for g in groups:
        fit(g, max_length)
        report["truncated_prompts"] += len(g.prompt) < g.prompt_tokens
        report["truncated_responses"] += g.truncated_responses
    return groups, report


# ---------------------------------------------------------------------------------------------
# groups -> tensors


def forward_groups(rm, groups: list[Group], pad_id: int, share_prefix: bool):
    """Run every response of every group. Returns (token scores (N, T, k) over the response tokens,
    response mask (N, T), group size K), N = len(groups) * K, with the responses of a group
    consecutive. Groups with fewer than K responses are padded with a copy of their first response;
    ``group_valid`` masks those out."""
    k = max(len(g.responses) for g in groups)
    device = next(rm.parameters()).device
    responses = [g.responses + [g.responses[0]] * (k - len(g.responses)) for g in groups]
    flat = [r for rs in responses for r in rs]
    width = max(len(r) for r in flat)
    if share_prefix:
        ids, mask, pos, starts = pack_shared_prefix([g.prompt for g in groups], responses, pad_id)
        scores = rm(ids.to(device), mask.to(device), position_ids=pos.to(device))
        rows = [b for b in range(len(groups)) for _ in range(k)]
        first = [s for st in starts for s in st]
    else:
        full = [g.prompt + r for g, rs in zip(groups, responses) for r in rs]
        ids = pad(full, pad_id, "right").to(device)
        scores = rm(ids, pad([[1] * len(s) for s in full], 0, "right").to(device))
        rows = list(range(len(full)))
        first = [len(g.prompt) for g in groups for _ in range(k)]
    # gather each response's tokens into its own row, starting at column 0
    idx = (torch.tensor(first)[:, None] + torch.arange(width)[None]).clamp(max=scores.shape[1] - 1).to(device)
    out = scores[torch.tensor(rows, device=device)[:, None], idx]
    cmask = pad([[1] * len(r) for r in flat], 0, "right").to(device)
    return out, cmask, k


def group_tokens(g: Group, share_prefix: bool) -> int:
    """Tokens one group takes in a forward pass: the packed row (prompt once, then every response), or
    one padded prompt + response row per response when not shared."""
    if share_prefix:
        return len(g.prompt) + sum(len(r) for r in g.responses)
    return len(g.responses) * (len(g.prompt) + max(len(r) for r in g.responses))


def eval_chunks(groups: list[Group], share_prefix: bool, token_budget: int, size: int) -> list[list[int]]:
    """Indices of ``groups`` in length-sorted forward passes: cut by ``token_budget`` padded tokens when
    it is set, else ``size`` groups at a time."""
    return length_batches([group_tokens(g, share_prefix) for g in groups], batch_size=size, token_budget=token_budget)


def pool_last(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Outputs at each row's last real token: (N, T, k) -> (N, k)."""
    return scores[torch.arange(scores.shape[0], device=scores.device), last_token_index(mask)]


def group_valid(groups: list[Group], k: int, device) -> torch.Tensor:
    return torch.tensor([[i < len(g.responses) for i in range(k)] for g in groups], device=device)
