"""The rollout vocabulary every sampling stage shares (``ppo``, ``pg``, ``bon``, ``label``, ``eval
policy``): the sampling flags, chat-templated prompts, one rollout phase (sample with an engine,
decode, score), and the frozen reference policy.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Literal

import torch

from rlhfkit.data import load_records
from rlhfkit.data.split import load_train_eval
from rlhfkit.data.template import encode_prompt
from rlhfkit.errors import ConfigError
from rlhfkit.models import disable_dropout, load_causal_lm
from rlhfkit.platform.placement import autocast_dtype
from rlhfkit.rollout.engine import RolloutEngine, SamplingParams, make_engine
from rlhfkit.rollout.rewards import RewardSource
from rlhfkit.rollout.sampler import Rollout, response_logprobs


@dataclass
class SamplingArgs:
    rollout: Literal["hf", "vllm"] = "hf"
    """Rollout engine: 'hf' (in-process KV-cache sampling with the policy itself) or 'vllm' (vLLM's offline
    engine in this process, weights synced after every optimiser step; an optional install)."""
    reward: str = ""
    """Reward: a saved reward-model folder, rule:FILE.yaml, an http(s):// scorer, or a weighted sum
    such as '1.0*runs/rm/final + 0.5*rule:r.yaml'."""
    max_new_tokens: int = 48
    """Most tokens sampled per response."""
    min_new_tokens: int = 0
    """EOS is forbidden before this many tokens."""
    temperature: float = 0.7
    """Sampling temperature; training and reference logprobs use the same one (0: greedy)."""
    top_k: int = 0
    """Sample from the k most likely tokens only (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens with this much probability."""
    missing_eos_penalty: float = 0.0
    """The 'EOS trick': subtracted from the score of a response that hit max_new_tokens without EOS."""
    reward_batch_size: int = 16
    """Responses per reward-model forward pass."""
    reward_timeout: float = 30.0
    """Seconds an http(s) reward may take to answer one request."""
    reward_retries: int = 3
    """Retries of an http(s) reward after a connection error, a timeout, a 5xx or a 429."""
    eval_prompts: int = 64
    """Held-out prompts for the final policy-vs-reference comparison (from --eval or --eval-size)."""
    eval_temperature: float = -1.0
    """Temperature of the held-out comparison (-1: the training temperature)."""


def sampling_params(cfg: SamplingArgs, tokenizer, temperature: float | None = None) -> SamplingParams:
    return SamplingParams(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                          max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature if temperature is None else temperature,
                          top_k=cfg.top_k, top_p=cfg.top_p, min_new_tokens=cfg.min_new_tokens)


# ---------------------------------------------------------------------------------------------
# prompts


@dataclass
class Prompts:
    records: list
    ids: list[list[int]]


def encode_prompts(tokenizer, records, cfg, log) -> Prompts:
    """Chat-templated prompt ids; prompts longer than max_length - max_new_tokens lose their oldest
    tokens (counted and reported)."""
    budget = cfg.max_length - cfg.max_new_tokens
    if budget < 8:
        raise ConfigError(f"--max-length {cfg.max_length} leaves no room for prompts after "
                          f"--max-new-tokens {cfg.max_new_tokens}")
    ids = [encode_prompt(tokenizer, r.prompt) for r in records]
    cut = sum(len(x) > budget for x in ids)
    if cut:
        log(f"{cut} prompts longer than {budget} tokens lost their oldest tokens")
    return Prompts(records, [x[-budget:] for x in ids])


def load_prompts(cfg, tokenizer, log) -> tuple[Prompts, Prompts]:
    """Training and held-out prompts (the first --eval-prompts of the held-out split), chat-templated."""
    train, held, _ = load_train_eval(cfg, "prompt", log)
    return encode_prompts(tokenizer, train, cfg, log), encode_prompts(tokenizer, held[: cfg.eval_prompts], cfg, log)


def prompts_from(cfg, tokenizer) -> Prompts:
    """All prompts of ``--train`` (first ``--limit``), chat-templated (the sampling stages without a
    held-out split: bon, label)."""
    records = load_records(cfg.train, kind="prompt", fields=cfg.fields, on_bad_record=cfg.on_bad_record).records
    return encode_prompts(tokenizer, records[: cfg.limit] if cfg.limit else records, cfg, print)


# ---------------------------------------------------------------------------------------------
# one rollout phase


@dataclass
class Batch:
    """A scored rollout: each prompt repeated k times, consecutive."""

    rollout: Rollout
    records: list
    texts: list[str]
    scores: torch.Tensor  # (B,) after the missing-EOS penalty
    raw_scores: torch.Tensor  # (B,) as the reward source gave them
    seconds: dict


def decode(tokenizer, rollout: Rollout) -> list[str]:
    return [tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip()
            for r, m in zip(rollout.response_ids, rollout.response_mask)]


def score_texts(reward: RewardSource, records, texts: list[str], rollout: Rollout,
                penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(score after the missing-EOS penalty, raw score) for each response. The reward sees the
    response text without EOS and the whole prompt conversation."""
    raw = torch.tensor(reward.score([r.prompt for r in records], texts, [r.meta for r in records]),
                       dtype=torch.float32)
    return raw - penalty * (~rollout.eos).float(), raw


def rollout_phase(engine: RolloutEngine, tokenizer, reward: RewardSource, prompts: Prompts, indices: list[int], k: int,
                  cfg, generator) -> Batch:
    """# 1. sample k responses per prompt, # 3. score them (the logprob phase is the stage's own)."""
    t0 = time.perf_counter()
    ids = [prompts.ids[i] for i in indices for _ in range(k)]
    records = [prompts.records[i] for i in indices for _ in range(k)]
    rollout = engine.generate(ids, sampling_params(cfg, tokenizer), generator)
    t1 = time.perf_counter()
    texts = decode(tokenizer, rollout)
    scores, raw = score_texts(reward, records, texts, rollout, cfg.missing_eos_penalty)
    return Batch(rollout, records, texts, scores, raw, {"time_generate": t1 - t0, "time_score": time.perf_counter() - t1})


def response_stats(rollout: Rollout) -> dict:
    lengths = rollout.lengths.float()
    return {"response_length": lengths.mean().item(), "eos_rate": rollout.eos.float().mean().item()}


# ---------------------------------------------------------------------------------------------
# the frozen reference


class Reference:
    """The frozen reference policy pi_ref. With LoRA it is the same model with the adapter switched off
    (no second copy); otherwise a frozen copy taken before training, or the model ``spec`` names."""

    def __init__(self, policy, mixed_precision: str = "no", spec: str = ""):
        self.copy = None
        if spec:
            self.copy = load_causal_lm(spec)[0]
            disable_dropout(self.copy)
        elif not hasattr(policy, "disable_adapter"):
            self.copy = copy.deepcopy(policy)
        if self.copy is not None:
            self.copy.eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)
            half = autocast_dtype(mixed_precision)
            if half is not None:
                self.copy.to(half)

    def to(self, device) -> Reference:
        if self.copy is not None:
            self.copy.to(device)
        return self

    def model(self, policy):
        """A context manager in which ``policy`` (possibly DDP-unwrapped) computes pi_ref, and the model to call."""
        if self.copy is not None:
            return contextlib.nullcontext(), self.copy
        return policy.disable_adapter(), policy

    @torch.no_grad()
    def logprobs(self, policy, rollout: Rollout, temperature: float, group: int = 1) -> torch.Tensor:
        ctx, model = self.model(policy)
        with ctx:
            return response_logprobs(model, rollout, temperature, group)

    def engine(self, policy, kind: str, device) -> RolloutEngine:
        """A rollout engine that samples from pi_ref: the frozen copy, or ``policy`` with its adapter off."""
        if self.copy is not None:
            return make_engine(kind, self.copy, device)
        return make_engine(kind, policy, device, adapter_off=True)
