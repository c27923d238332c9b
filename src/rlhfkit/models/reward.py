"""Reward models: a transformer backbone with a small head, stored as a Hugging Face
``AutoModelForSequenceClassification`` so transformers, TRL and RewardBench load it as it is.

* ``num_labels=1``: a scalar reward, read at the **last non-pad token** (the EOS of the response).
  The index comes from the attention mask, so the score does not depend on the padding side or the
  batch size (reference §8 item 1), and equals what transformers computes from ``pad_token_id``.
* ``num_labels=3``: bad / mid / good classes (ratings), or wrong / neutral / correct per step (PRM).
* The same head read at every token gives an outcome RM's token-level verifier (ORM).

Chosen and rejected share their prompt (for HH-RLHF, almost the whole transcript).
:func:`pack_shared_prefix` puts the prompt once and every response after it in one row, with an
attention mask that keeps the responses apart: about half the work for pairwise training, and the
same numbers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rlhfkit.data.batching import length_batches
from rlhfkit.data.template import encode_prompt, encode_response, pad, position_ids, truncate
from rlhfkit.models.loading import (
    ensure_pad_token,
    load_tokenizer,
    reload_quantized,
    resolve_model_path,
    tiny_config,
)
from rlhfkit.models.lora import merged_fp32

BIAS_KEY = "rlhfkit_reward_bias"  # config field: score = head output - bias (reference §1d)


def init_reward_head(head: nn.Linear, zero: bool = False) -> None:
    """Head weight ~ N(0, 1/sqrt(d+1)), no bias (reference §1b item 8; the Stiennon et al. typo drops
    the sqrt). ``zero=True`` gives the value head's zero init (reference §1c item 11)."""
    with torch.no_grad():
        if zero:
            head.weight.zero_()
        else:
            head.weight.normal_(0.0, 1.0 / math.sqrt(head.weight.shape[1] + 1))
        if head.bias is not None:
            head.bias.zero_()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token of each row, for left or right padding: (B, T) -> (B,).

    ``cumsum`` reaches its maximum at the last real token and stays there; ``argmax`` returns the
    first position of the maximum."""
    return attention_mask.long().cumsum(-1).argmax(-1)


class RewardModel(nn.Module):
    """A sequence-classification model and the forward passes reward training needs.

    ``forward`` goes through this module so DDP/FSDP wrappers see every pass."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    # the backbone and head, seen through a peft wrapper if there is one
    def _parts(self):
        base = self.hf.get_base_model() if hasattr(self.hf, "get_base_model") else self.hf
        return getattr(base, base.base_model_prefix), base.score

    @property
    def config(self):
        return self.hf.config

    @property
    def num_labels(self) -> int:
        return self.hf.config.num_labels

    @property
    def bias(self) -> float:
        return float(getattr(self.hf.config, BIAS_KEY, 0.0) or 0.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Head outputs at every token: (B, T, num_labels), with the bias subtracted.

        ``attention_mask`` is a (B, T) padding mask, or the (B, 1, T, T) boolean mask of rows
        packed by :func:`pack_shared_prefix` (then pass its ``position_ids``)."""
        return self._head(self.hidden(input_ids, attention_mask, position_ids))

    def hidden(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """The backbone's last hidden state, the head's input: (B, T, d)."""
        backbone, _ = self._parts()
        if position_ids is None:
            position_ids = _positions(attention_mask)
        return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False).last_hidden_state

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head in its own weight dtype, outside autocast: under bf16 autocast a bf16 head would
        round rewards to 8 significant bits (steps of 1/128 near 1), turning close pairs into ties."""
        head = self._parts()[1]
        with torch.autocast(hidden.device.type, enabled=False):
            scores = head(hidden.to(head_dtype(head, hidden.dtype)))
        return scores - self.bias if self.bias else scores

    def pooled_and_embedded(self, input_ids, attention_mask, response_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass, two readings: the reward at the last non-pad token, (B,), and the mean of the last
        hidden state over the response tokens, (B, d): the features the OOD monitor compares."""
        hidden = self.hidden(input_ids, attention_mask)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        w = response_mask.to(hidden.dtype).unsqueeze(-1)
        return self._head(last).squeeze(-1), (hidden * w).sum(1) / w.sum(1).clamp(min=1)

    def pooled(self, input_ids, attention_mask) -> torch.Tensor:
        """Outputs at the last non-pad token: (B, num_labels); (B,) when num_labels is 1."""
        scores = self(input_ids, attention_mask)
        out = scores[torch.arange(scores.shape[0], device=scores.device), last_token_index(attention_mask)]
        return out.squeeze(-1) if self.num_labels == 1 else out


def head_dtype(head: nn.Module, fallback: torch.dtype) -> torch.dtype:
    """The dtype the head computes in: its trained weights' (under LoRA the head is a wrapper holding a
    trained fp32 copy and a frozen original, stored in bf16 under bf16 mixed precision), else any of
    its weights', else ``fallback`` (a sharding wrapper may show no parameters)."""
    params = list(head.parameters())
    trained = [p for p in params if p.requires_grad]
    return (trained or params)[0].dtype if params else fallback


def _positions(mask: torch.Tensor) -> torch.Tensor:
    if mask.ndim != 2:
        raise ValueError("a 4D attention mask needs explicit position_ids")
    return position_ids(mask)


def pack_shared_prefix(prompts: list[list[int]], responses: list[list[list[int]]], pad_id: int):
    """Pack each prompt and all its responses into one row, so the prompt is computed once.

    Row b is ``prompt_b + response_b1 + response_b2 + ...``, right-padded. The boolean attention
    mask (B, 1, T, T) lets a prompt token see the prompt before it and a response token see the
    prompt and the earlier tokens of its own response, never another response; every response's
    positions continue from the end of the prompt. Each response is therefore computed exactly as
    in ``prompt + response`` alone, at the cost of ``len(prompt) + sum(len(responses))`` tokens
    instead of ``K * len(prompt) + sum(len(responses))`` (about half for HH-RLHF pairs).

    Returns (input_ids, mask, position_ids, starts) with starts[b][k] the index of the first token
    of response k in row b.
    """
    rows, segs, pos, starts = [], [], [], []
    for prompt, resp in zip(prompts, responses):
        ids, seg, p, st = list(prompt), [0] * len(prompt), list(range(len(prompt))), []
        for k, r in enumerate(resp, start=1):
            st.append(len(ids))
            ids += r
            seg += [k] * len(r)
            p += range(len(prompt), len(prompt) + len(r))
        rows.append(ids), segs.append(seg), pos.append(p), starts.append(st)
    input_ids = pad(rows, pad_id, "right")
    seg = pad(segs, -1, "right")
    positions = pad(pos, 0, "right")
    t = input_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    q, k = seg[:, :, None], seg[:, None, :]
    mask = causal & (k != -1) & ((k == 0) | (k == q))
    mask |= torch.eye(t, dtype=torch.bool)  # padding rows attend to themselves (never NaN)
    return input_ids, mask[:, None], positions, starts


def load_reward_model(spec: str, num_labels: int = 1, seed: int = 0, dtype=torch.float32, quantization=None):
    """(RewardModel, tokenizer) for a spec. A saved reward model (``*ForSequenceClassification``)
    loads as it is; a causal LM gets a fresh head initialised N(0, 1/sqrt(d+1)) from ``seed``.
    ``quantization``: a transformers quantisation config (QLoRA's 4-bit base; the head stays fp32)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tokenizer = load_tokenizer(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.startswith("tiny"):
            config = tiny_config(spec, vocab_size=len(tokenizer))
            config.num_labels = num_labels
            hf = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
            if quantization is not None:
                hf = reload_quantized(hf, AutoModelForSequenceClassification, quantization, dtype)
            fresh = True
        else:
            folder = resolve_model_path(spec)
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
            fresh = not any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
            kwargs = {"num_labels": num_labels} if fresh else {}
            hf = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                                    quantization_config=quantization, **kwargs)
        if fresh:
            init_reward_head(hf.score)
    ensure_pad_token(tokenizer, hf)
    hf.eval()
    return RewardModel(hf), tokenizer


def save_reward_model(model: RewardModel | nn.Module, tokenizer, folder, state_dict=None) -> None:
    """Save as ``AutoModelForSequenceClassification`` (LoRA merged), with the tokenizer."""
    hf = model.hf if isinstance(model, RewardModel) else model
    plain = merged_fp32(hf)
    if plain is not hf:
        hf, state_dict = plain, None
    hf.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def encode_pair(tokenizer, prompt, response, max_length: int) -> tuple[list[int], int, int]:
    """One (prompt, response) as the reward model reads it: (token ids, the number of response tokens at
    their end, the pair's length before truncation). A pair longer than ``max_length`` loses its
    oldest prompt tokens (and, if the response alone is too long, the response's first tokens)."""
    prompt_ids, full = encode_prompt(tokenizer, prompt), encode_response(tokenizer, response, prompt)
    resp = full[-(max_length - 1):]
    ids = truncate(prompt_ids, resp, max_length, "prompt_left").input_ids
    return ids, min(len(resp), len(ids)), len(prompt_ids) + len(full)


def encode_pairs(tokenizer, prompts, responses, max_length: int) -> tuple[list[list[int]], list[int]]:
    """:func:`encode_pair` for many pairs: (token ids of each, response tokens of each)."""
    encoded = [encode_pair(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    return [e[0] for e in encoded], [e[1] for e in encoded]


@torch.no_grad()
def read_sequences(model: RewardModel, seqs: list[list[int]], n_response: list[int], pad_id: int,
                   batches: list[list[int]], read, side: str = "right") -> tuple[torch.Tensor, ...]:
    """``read(model, ids, mask, response_mask)`` (a tuple of tensors) on each batch of token sequences,
    ``batches`` being lists of indices into ``seqs``, in eval mode; each output in the order of
    ``seqs``. ``n_response[i]`` is the number of response tokens at the end of sequence i."""
    device = next(model.parameters()).device
    out, done = [], []
    was_training = model.training
    model.eval()
    for idx in batches:
        chunk = [seqs[j] for j in idx]
        ids = pad(chunk, pad_id, side).to(device)
        mask = pad([[1] * len(s) for s in chunk], 0, side).to(device)
        response = pad([[0] * (len(s) - n_response[j]) + [1] * n_response[j] for s, j in zip(chunk, idx)], 0,
                       side).to(device)
        out.append([t.float().cpu() for t in read(model, ids, mask, response)])
        done += idx
    model.train(was_training)
    if not out:
        return torch.zeros(0), torch.zeros(0)
    back = torch.tensor(done).argsort()  # where each sequence's row landed
    return tuple(torch.cat(parts)[back] for parts in zip(*out))


def _pooled_batches(model: RewardModel, tokenizer, prompts, responses, batch_size: int, max_length: int, side: str,
                    read):
    """:func:`read_sequences` on encoded pairs, in batches of ``batch_size`` cut from the pairs sorted by
    length, so a batch pads to about its own length."""
    seqs, n_response = encode_pairs(tokenizer, prompts, responses, max_length)
    return read_sequences(model, seqs, n_response, tokenizer.pad_token_id,
                          length_batches([len(x) for x in seqs], batch_size=batch_size), read, side)


def read_reward(model: RewardModel, ids, mask, response) -> tuple[torch.Tensor]:
    """The reward at each row's last non-pad token (a ``read`` for :func:`read_sequences`)."""
    return (model.pooled(ids, mask),)


def read_reward_and_features(model: RewardModel, ids, mask, response) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward and the OOD features (mean last hidden state over the response) from one pass."""
    return model.pooled_and_embedded(ids, mask, response)


def score(model: RewardModel, tokenizer, prompts: list[list[dict]], responses: list, batch_size: int = 8,
          max_length: int = 1024, side: str = "right") -> list[float]:
    """Rewards for (prompt, response) pairs, batched. A prompt is a list of messages (a whole
    multi-turn dialogue is scored); a response is a string or a list of further messages.
    Pairs longer than ``max_length`` lose their oldest prompt tokens."""
    return _pooled_batches(model, tokenizer, prompts, responses, batch_size, max_length, side, read_reward)[0].tolist()


def score_and_embed(model: RewardModel, tokenizer, prompts: list[list[dict]], responses: list, batch_size: int = 8,
                    max_length: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (N,) and OOD features (N, d) from one forward pass per batch.

    The features are the mean of the backbone's last hidden state over the response tokens, the
    mean-pooled embedding Ren et al. (2023, *Out-of-distribution detection and selective generation
    for conditional language models*) found best for Mahalanobis OOD detection with language models.
    The hidden state at the scoring token alone says little about what was read: on the bundled
    model it let through half of the non-English texts."""
    return _pooled_batches(model, tokenizer, prompts, responses, batch_size, max_length, "right",
                           read_reward_and_features)


def embed(model: RewardModel, tokenizer, prompts: list[list[dict]], responses: list, batch_size: int = 8,
          max_length: int = 1024) -> torch.Tensor:
    """The OOD features of :func:`score_and_embed`: (N, d) in fp32."""
    return score_and_embed(model, tokenizer, prompts, responses, batch_size, max_length)[1]
