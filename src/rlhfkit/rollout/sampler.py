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

from dataclasses import dataclass

import torch

from rlhfkit.data.template import pad, position_ids


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


@torch.no_grad()
def sample(model, prompts: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int = 64,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0,
           generator: torch.Generator | None = None, on_token=None) -> Rollout:
    """Sample one response per prompt (token ids). ``temperature=0`` is greedy (logprobs at T=1).
    ``min_new_tokens`` forbids EOS before that many tokens. ``on_token(tokens, logprobs, live)``, when
    given, sees each step's tokens as they are drawn (a streaming server sends them on)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = pad(prompts, pad_id, "left").to(device)
    mask = pad([[1] * len(p) for p in prompts], 0, "left").to(device)
    batch = ids.shape[0]
    temp = temperature if temperature > 0 else 1.0

    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1]
    next_pos = mask.sum(-1, keepdim=True)  # position of the next token: prompt length
    full_mask = mask
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logps, alive = [], [], []
    for step in range(max_new_tokens):
        scaled = logits.float() / temp
        if step < min_new_tokens:
            scaled[:, eos_id] = float("-inf")
        logp_all = torch.log_softmax(scaled, -1)
        if temperature > 0:
            probs = filter_logits(scaled, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            token = scaled.argmax(-1)
        logp = logp_all.gather(-1, token[:, None]).squeeze(-1)
        live = ~done
        tokens.append(torch.where(live, token, torch.full_like(token, pad_id)))
        logps.append(torch.where(live, logp, torch.zeros_like(logp)))
        alive.append(live)
        if on_token is not None:
            on_token(tokens[-1], logps[-1], live)
        done = done | (token == eos_id)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        full_mask = torch.cat([full_mask, live[:, None].long()], 1)
        out = model(input_ids=tokens[-1][:, None], attention_mask=full_mask, position_ids=next_pos,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    model.train(was_training)
    response = torch.stack(tokens, 1)
    rmask = torch.stack(alive, 1).long()
    eos = ((response == eos_id) & rmask.bool()).any(-1)
    return Rollout(ids, mask, response, rmask, torch.stack(logps, 1), eos)


def response_logits(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """Teacher-forced logits for each response token at the temperature: ``logits[:, P-1:-1] / T``,
    (B, R, V), with the sampler's mask and position ids. Only the last R+1 positions go through the
    LM head."""
    mask = rollout.attention_mask
    r = rollout.response_ids.shape[1]
    out = model(input_ids=rollout.input_ids, attention_mask=mask, position_ids=position_ids(mask),
                use_cache=False, logits_to_keep=r + 1)
    temp = temperature if temperature > 0 else 1.0
    return out.logits[:, :-1].float() / temp


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens]: (B, R, V), (B, R) -> (B, R)."""
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)


def response_logprobs(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """Teacher-forced logprobs of the sampled tokens, 0 on padding: (B, R)."""
    logits = response_logits(model, rollout, temperature)
    return gather_logprobs(logits, rollout.response_ids) * rollout.response_mask


def response_values(critic, rollout: Rollout) -> torch.Tensor:
    """Critic values V(s_t) for each response position: the value head at the token *before*
    response token t (the state it is sampled from), 0 on padding: (B, R)."""
    mask = rollout.attention_mask
    p, r = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    out = critic(rollout.input_ids, mask, position_ids=position_ids(mask))
    return out[:, p - 1: p + r - 1, 0].float() * rollout.response_mask
