"""Reward models: a transformer backbone with a small head, stored as a Hugging Face
``AutoModelForSequenceClassification`` so transformers, TRL and RewardBench load it as it is.

* ``num_labels=1``: a scalar reward, read at the **last non-pad token** (the EOS of the response).
  The index comes from the attention mask, so the score does not depend on the padding side or the
  batch size (reference §8 item 1), and equals what transformers computes from ``pad_token_id``.
* ``num_labels=3``: bad / mid / good classes (ratings), or wrong / neutral / correct per step (PRM).
* The same head read at every token gives an outcome RM's token-level verifier (ORM).

Chosen and rejected share their prompt (for HH-RLHF, almost the whole transcript). ``forward`` can
run the prompt once, repeat its key/value cache for each response, and run only the responses
through the network: about half the work for pairwise training, and the same numbers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rlhfkit.data.template import pad, position_ids

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
                prefix_ids: torch.Tensor | None = None, prefix_mask: torch.Tensor | None = None,
                repeats: int = 1) -> torch.Tensor:
        """Head outputs at every token: (B, T, num_labels), with the bias subtracted.

        Without a prefix, ``input_ids`` are whole sequences. With one, ``prefix_ids`` (P, Tp) are
        left-padded prompts run once, their cache repeated ``repeats`` times, and ``input_ids``
        (P * repeats, T) are the right-padded continuations of each prompt in turn; the outputs are
        for the continuation tokens only.
        """
        backbone, head = self._parts()
        if prefix_ids is None:
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        else:
            out = backbone(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=position_ids(prefix_mask),
                           use_cache=True)
            cache = out.past_key_values
            cache.batch_repeat_interleave(repeats)
            full_mask = torch.cat([prefix_mask.repeat_interleave(repeats, 0), attention_mask], 1)
            pos = position_ids(full_mask)[:, prefix_ids.shape[1]:]
            hidden = backbone(input_ids=input_ids, attention_mask=full_mask, position_ids=pos,
                              past_key_values=cache, use_cache=True).last_hidden_state
        scores = head(hidden)
        return scores - self.bias if self.bias else scores

    def pooled(self, input_ids, attention_mask, **prefix) -> torch.Tensor:
        """Outputs at the last non-pad token: (B, num_labels); (B,) when num_labels is 1."""
        scores = self(input_ids, attention_mask, **prefix)
        out = scores[torch.arange(scores.shape[0], device=scores.device), last_token_index(attention_mask)]
        return out.squeeze(-1) if self.num_labels == 1 else out


def load_reward_model(spec: str, num_labels: int = 1, seed: int = 0, dtype=torch.float32):
    """(RewardModel, tokenizer) for a spec. A saved reward model (``*ForSequenceClassification``)
    loads as it is; a causal LM gets a fresh head initialised N(0, 1/sqrt(d+1)) from ``seed``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rlhfkit.models.loading import ensure_pad_token, load_tokenizer, resolve_model_path, tiny_config

    tokenizer = load_tokenizer(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.startswith("tiny"):
            config = tiny_config(spec, vocab_size=len(tokenizer))
            config.num_labels = num_labels
            hf = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
            fresh = True
        else:
            folder = resolve_model_path(spec)
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
            fresh = not any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
            kwargs = {"num_labels": num_labels} if fresh else {}
            hf = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                                    **kwargs)
        if fresh:
            init_reward_head(hf.score)
    ensure_pad_token(tokenizer, hf)
    hf.eval()
    return RewardModel(hf), tokenizer


def save_reward_model(model: RewardModel | nn.Module, tokenizer, folder, state_dict=None) -> None:
    """Save as ``AutoModelForSequenceClassification`` (LoRA merged), with the tokenizer."""
    hf = model.hf if isinstance(model, RewardModel) else model
    if hasattr(hf, "merge_and_unload"):
        import copy

        hf = copy.deepcopy(hf).merge_and_unload()
        state_dict = None
    hf.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)


@torch.no_grad()
def score(model: RewardModel, tokenizer, prompts: list[list[dict]], responses: list, batch_size: int = 8,
          max_length: int = 1024, side: str = "right") -> list[float]:
    """Rewards for (prompt, response) pairs, batched. A prompt is a list of messages (a whole
    multi-turn dialogue is scored); a response is a string or a list of further messages.
    Pairs longer than ``max_length`` lose their oldest prompt tokens."""
    from rlhfkit.data.template import encode_prompt, encode_response, truncate

    device = next(model.parameters()).device
    seqs = []
    for p, r in zip(prompts, responses):
        resp = encode_response(tokenizer, r, p)[-(max_length - 1):]
        seqs.append(truncate(encode_prompt(tokenizer, p), resp, max_length, "prompt_left").input_ids)
    out: list[float] = []
    was_training = model.training
    model.eval()
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i: i + batch_size]
        ids = pad(chunk, tokenizer.pad_token_id, side).to(device)
        mask = pad([[1] * len(s) for s in chunk], 0, side).to(device)
        out.extend(model.pooled(ids, mask).float().tolist())
    model.train(was_training)
    return out
