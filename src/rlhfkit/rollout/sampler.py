"""Batched sampling with a KV cache, and teacher-forced logprobs that match it exactly.

:func:`sample` left-pads the prompts, runs them once (prefill) and then one token per step for the
whole batch from the key/value cache. Position ids skip the padding (``cumsum(mask) - 1``), in
prefill and in every decoding step, so a left-padded row computes exactly what it would alone
(reference §1a item 3, §8 item 11). Each step scales the logits by the temperature, samples from
them after top-k / top-p filtering, and records the *temperature-scaled, unfiltered* logprob of the
sampled token: the quantity the trainer recomputes (reference §1c item 10, §8 item 4). A row
stops at EOS (kept, mask 1) or at ``max_new_tokens``; after it stops it gets pad tokens with mask 0.

:func:`response_logprobs` recomputes those logprobs with one forward pass over prompt + response, with
the same mask, positions and temperature, reading ``logits[:, P-1:-1]`` (reference §8 item 10).
On the first PPO minibatch the ratio is therefore exactly 1.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

from rlhfkit.data.template import pad, position_ids
from rlhfkit.models.reward import pack_shared_prefix
from rlhfkit.platform.kernels import decode_kernels


@dataclass
class Rollout:
    """A batch of sampled responses. P prompt columns (left-padded), R response columns (right-padded)."""

    prompt_ids: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R) 1 up to and including EOS
    logprobs: torch.Tensor  # (B, R) sampler's logprobs at the temperature, 0 on padding
    eos: torch.Tensor  # (B,) bool: the response ended with EOS (not cut at max_new_tokens)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], 1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def select(self, idx) -> Rollout:
        """The rows ``idx`` (a minibatch), trimmed to their longest response."""
        width = max(int(self.response_mask[idx].sum(-1).max()), 1)
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx, :width],
                       self.response_mask[idx, :width], self.logprobs[idx, :width], self.eos[idx])


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p, Holtzman et al. 2020) filtering: excluded tokens get -inf.
    The most likely token always survives."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already cover top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None,
         block: int = 256) -> torch.Tensor:
    """One token per row from the categorical ``probs`` (B, V; weights, normalised or not), by inverting its CDF at one uniform draw
    per row: exact, and B random numbers instead of the B x V exponentials ``torch.multinomial`` draws.
    ``generator`` may be a list with one generator per row: each row's tokens then depend on its own
    stream alone, not on the rows beside it in the batch.

    The CDF is inverted in two levels, since a running sum over V = 49k entries is a slow sequential
    scan on a CPU: the sums of blocks of ``block`` entries (one vectorised reduction) and their running
    sum (V / block entries) pick the block where u falls; the running sum inside that block alone picks
    the token. Only the order of the float additions differs from one running sum over the row. Where
    rounding puts u at or past a sum's end, the last entry with positive probability is taken, so a token
    of probability 0 (filtered out by top-k or top-p) is never drawn."""
    b, v = probs.shape
    if isinstance(generator, list):
        u = torch.cat([torch.rand(1, generator=g) for g in generator])[:, None].to(probs.device)
    else:
        u = torch.rand(b, 1, generator=generator, device=probs.device)
    blocks = (F.pad(probs, (0, -v % block)) if v % block else probs).reshape(b, -1, block)  # no copy at V = 49,152
    cdf = blocks.sum(-1).cumsum(-1)  # (B, V / block)
    u = u * cdf[:, -1:]
    last = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)  # the last block with positive mass
    chosen = torch.minimum(torch.searchsorted(cdf, u, right=True), last)  # (B, 1)
    before = torch.where(chosen > 0, cdf.gather(-1, (chosen - 1).clamp(min=0)), torch.zeros_like(u))
    inner = blocks.gather(1, chosen[..., None].expand(-1, 1, block)).squeeze(1).cumsum(-1)  # (B, block)
    last = (inner < inner[:, -1:]).sum(-1, keepdim=True)  # the last entry with positive probability
    within = torch.minimum(torch.searchsorted(inner, u - before, right=True), last)
    return (chosen * block + within).squeeze(-1)


def prefill(model, prompts: list[list[int]], pad_id: int, max_new_tokens: int):
    """Run the prompts once and return a static cache with room for ``max_new_tokens`` more, the logits
    of each row's next token, and the mask of the cache's prompt columns (B, P).

    Work that rows share is done once (what vLLM's prefix caching does): a prompt that repeats (the k
    samples of a prompt for RLOO / GRPO) is run once and its keys and values copied into each of its
    rows, and the prefix every prompt starts with (the chat template's system turn) is run once for the
    batch. The cache then holds [shared prefix | left-padded rest]: padding in the middle computes the
    same as padding on the left, since positions skip it and the mask hides it."""
    device = next(model.parameters()).device
    unique = list(dict.fromkeys(map(tuple, prompts)))
    row = {p: i for i, p in enumerate(unique)}
    inverse = torch.tensor([row[tuple(p)] for p in prompts], device=device)
    n = min(len(p) for p in unique) - 1  # every prompt keeps a token of its own
    shared = next((i for i in range(n) if len({p[i] for p in unique}) > 1), n) if len(unique) > 1 else 0
    rest = [list(p[shared:]) for p in unique]
    ids, mask = pad(rest, pad_id, "left").to(device), pad([[1] * len(p) for p in rest], 0, "left").to(device)
    cache = None
    if shared:
        out = model(input_ids=torch.tensor([unique[0][:shared]], device=device), use_cache=True)
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(layer_kv(returned_cache(out))):
            cache.update(keys.expand(len(unique), -1, -1, -1), values.expand(len(unique), -1, -1, -1), layer)
        mask = torch.cat([torch.ones(len(unique), shared, dtype=mask.dtype, device=device), mask], 1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)[:, shared:], use_cache=True,
                logits_to_keep=1, **{cache_keyword(model): cache})
    static = StaticCache(config=model.config, max_cache_len=mask.shape[1] + max_new_tokens)
    for layer, (keys, values) in enumerate(layer_kv(returned_cache(out))):
        static.update(keys.index_select(0, inverse), values.index_select(0, inverse), layer)
    return static, out.logits[:, -1].index_select(0, inverse), mask.index_select(0, inverse)


def returned_cache(out):
    """The KV cache a forward returned: ``out.cache`` from transformers 5.24, ``past_key_values`` before."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def cache_keyword(model) -> str:
    """The name a model's forward takes its KV cache under: ``cache`` from transformers 5.24 (where
    ``past_key_values`` is deprecated), ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def layer_kv(cache):
    """(keys, values) of each layer of a transformers cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.no_grad()
def sample(model, prompts: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int = 64,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0,
           generator: torch.Generator | list[torch.Generator] | None = None, on_token=None,
           packed: dict | None = None) -> Rollout:
    """Sample one response per prompt (token ids). ``temperature=0`` is greedy (logprobs at T=1).
    ``min_new_tokens`` forbids EOS before that many tokens. ``on_token(tokens, logprobs, live)``, when
    given, sees each step's tokens as they are drawn (a streaming server sends them on). ``packed``: a
    dict the caller keeps, for the CPU decoding kernels (:class:`PackedLinear`)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = pad(prompts, pad_id, "left").to(device)
    mask = pad([[1] * len(p) for p in prompts], 0, "left").to(device)
    batch = ids.shape[0]
    temp = temperature if temperature > 0 else 1.0

    cache, logits, cache_mask = prefill(model, prompts, pad_id, max_new_tokens)
    full_mask = F.pad(cache_mask, (0, max_new_tokens))  # the static cache's columns
    keyword = cache_keyword(model)
    next_pos = mask.sum(-1, keepdim=True)  # position of the next token: prompt length
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logps, alive = [], [], []
    with decode_kernels(model, batch, packed):
        for step in range(max_new_tokens):
            scaled = logits.float() / temp
            if step < min_new_tokens:
                scaled[:, eos_id] = float("-inf")
            # one pass of exponentials serves the draw (unnormalised weights) and the logprob of the token
            # drawn: the temperature-scaled, unfiltered log softmax, s_t - m - log sum exp(s - m)
            top = scaled.max(-1, keepdim=True).values
            weights = (scaled - top).exp()
            if temperature > 0:
                token = draw(filter_logits(scaled, top_k, top_p).softmax(-1) if top_k or top_p < 1 else weights, generator)
            else:
                token = scaled.argmax(-1)
            logp = (scaled.gather(-1, token[:, None]) - top).squeeze(-1) - weights.sum(-1).log()
            live = ~done
            tokens.append(torch.where(live, token, torch.full_like(token, pad_id)))
            logps.append(torch.where(live, logp, torch.zeros_like(logp)))
            alive.append(live)
            if on_token is not None:
                on_token(tokens[-1], logps[-1], live)
            done = done | (token == eos_id)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            full_mask[:, cache_mask.shape[1] + step] = live.long()
            out = model(input_ids=tokens[-1][:, None], attention_mask=full_mask, position_ids=next_pos,
                        use_cache=True, **{keyword: cache})
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
    model.train(was_training)
    response = torch.stack(tokens, 1)
    rmask = torch.stack(alive, 1).long()
    eos = ((response == eos_id) & rmask.bool()).any(-1)
    return Rollout(ids, mask, response, rmask, torch.stack(logps, 1), eos)


def response_logits(model, rollout: Rollout, temperature: float = 1.0, group: int = 1, hidden: bool = False):
    """Teacher-forced logits for each response token at the temperature: ``logits[:, P-1:-1] / T``,
    (B, R, V), with the sampler's mask and position ids. Only the last R+1 positions go through the
    LM head. ``hidden=True`` (one row per sample): also the final hidden states they are computed from,
    (B, R, d), what a value head on the policy's own trunk reads.

    ``group`` > 1: the rows come in consecutive groups of ``group`` that share their prompt (the k
    samples of RLOO / GRPO). Each group is then one packed row, its prompt computed once
    (:func:`pack_groups`); every response token sees exactly what it sees in its own row, so the
    logits are the same up to float rounding, at P + sum(R_j) tokens a group instead of k (P + R)."""
    temp = temperature if temperature > 0 else 1.0
    if group > 1:
        ids, mask, pos, source = pack_groups(rollout, group)
        keep = ids.shape[1] - int(source.min())  # the LM head runs from the first position read on
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=keep)
        rows = torch.arange(rollout.response_ids.shape[0], device=ids.device) // group
        return out.logits[rows[:, None], source - (ids.shape[1] - keep)].float() / temp
    mask = rollout.attention_mask
    r = rollout.response_ids.shape[1]
    out = model(input_ids=rollout.input_ids, attention_mask=mask, position_ids=position_ids(mask),
                use_cache=False, logits_to_keep=r + 1, output_hidden_states=hidden)
    logits = out.logits[:, :-1].float() / temp
    return (logits, out.hidden_states[-1][:, -r - 1:-1]) if hidden else logits


def pack_groups(rollout: Rollout, group: int):
    """A rollout whose rows come in groups of ``group`` with the same prompt, as one packed row per
    group: ``prompt + response_1 + ... + response_k`` (padding removed) with the attention mask of
    :func:`rlhfkit.models.reward.pack_shared_prefix` (a response sees the prompt and its own earlier
    tokens, never another response; its positions continue from the prompt's end).

    Returns (input_ids (G, T), mask (G, 1, T, T), position_ids (G, T), source (B, R)): ``source[b, t]``
    is the packed position whose logits predict response token t of row b (the prompt's last token for
    t = 0, then the response's own previous token); padding positions point at the prompt's last token."""
    b, p = rollout.prompt_ids.shape
    if b % group or not torch.equal(rollout.prompt_ids.view(-1, group, p), rollout.prompt_ids[::group, None].expand(-1, group, -1)):
        raise ValueError(f"pack_groups: the {b} rows are not groups of {group} that share their prompt")
    plens, rlens = rollout.prompt_mask.sum(-1).tolist(), rollout.response_mask.sum(-1).tolist()
    prompts = [rollout.prompt_ids[g, p - plens[g]:].tolist() for g in range(0, b, group)]
    responses = [[rollout.response_ids[i, :rlens[i]].tolist() for i in range(g, g + group)] for g in range(0, b, group)]
    ids, mask, pos, starts = pack_shared_prefix(prompts, responses, pad_id=0)  # padding is masked: any id
    width = rollout.response_ids.shape[1]
    source = torch.empty(b, width, dtype=torch.long)
    for i in range(b):
        last, start = len(prompts[i // group]) - 1, starts[i // group][i % group]
        source[i] = last
        source[i, 1:rlens[i]] = torch.arange(start, start + rlens[i] - 1)
    device = rollout.prompt_ids.device
    return ids.to(device), mask.to(device), pos.to(device), source.to(device)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens]: (B, R, V), (B, R) -> (B, R)."""
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)


def response_logprobs(model, rollout: Rollout, temperature: float = 1.0, group: int = 1) -> torch.Tensor:
    """Teacher-forced logprobs of the sampled tokens, 0 on padding: (B, R). ``group``: see
    :func:`response_logits`."""
    logits = response_logits(model, rollout, temperature, group)
    return gather_logprobs(logits, rollout.response_ids) * rollout.response_mask


def response_values(critic, rollout: Rollout) -> torch.Tensor:
    """Critic values V(s_t) for each response position: the value head at the token *before*
    response token t (the state it is sampled from), 0 on padding: (B, R)."""
    mask = rollout.attention_mask
    p, r = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    out = critic(rollout.input_ids, mask, position_ids=position_ids(mask))
    return out[:, p - 1: p + r - 1, 0].float() * rollout.response_mask
