"""PPO actor-critic with a KL penalty to a frozen reference (``rlhfkit ppo``).

Four roles (Ziegler et al. 2019; Ouyang et al. 2022): the policy (actor), the frozen reference (the
policy with its LoRA adapter switched off, or a frozen copy), the reward source, and the value
model (critic: a zero-initialised value head on the reward model's or the policy's backbone).

Each step::

    # 1. rollout             sample one response per prompt (KV cache, temperature T)
    # 2. logprobs, values    teacher-forced logprobs of policy and reference at T; critic values
    # 3. score               reward source on the text; missing-EOS penalty
    # 4. rewards             r_t = -beta * KL_t, + score at the EOS token
    # 5. advantages          GAE(gamma, lambda) on the critic's values; whitening
    # 6. PPO epochs          shuffled minibatches, clipped policy + clipped value loss (+ entropy, + ptx)
    # 7. KL controller       adapt beta (Ziegler et al.) and log

The ``a2c`` preset (seed 004) is one epoch, one minibatch and no clipping: the advantage
actor-critic loss -A*log pi + vf_coef * 0.5 (V - R)^2.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
from dataclasses import dataclass
from typing import Literal

from torch import nn
from torch.utils.checkpoint import checkpoint

from rlhfkit.config import DataArgs, ModelArgs, OptimArgs, RunArgs
from rlhfkit.data import load_records
from rlhfkit.data.batching import collate
from rlhfkit.data.template import encode_examples
from rlhfkit.errors import ConfigError
from rlhfkit.eval.monitors import MonitorArgs
from rlhfkit.losses.advantages import gae, token_rewards, whiten
from rlhfkit.losses.kl import kl_penalty
from rlhfkit.losses.lm import sft_loss
from rlhfkit.losses.ppo import aggregate, entropy, policy_loss, value_loss
from rlhfkit.models.reward import BIAS_KEY, init_reward_head, load_reward_model
from rlhfkit.platform.distributed import gathered, shards_parameters
from rlhfkit.platform.kernels import cpu_kernels
from rlhfkit.rollout.phase import SamplingArgs, rollout_phase
from rlhfkit.rollout.rewards import single_reward_model
from rlhfkit.rollout.sampler import Rollout, gather_logprobs, response_logits, response_values
from rlhfkit.run import Run, progress
from rlhfkit.train.common import backward, optimizer_step, prepare_model, quantization, stop_on_nonfinite
from rlhfkit.train.rl import (
    CorrectionArgs,
    KLArgs,
    end_step,
    engine_correction,
    explained_variance,
    finish,
    logprob_phase,
    loss_total,
    mean_stats,
    minibatches,
    prepare_rl,
    rollout_metrics,
    row_generators,
    start_rl,
    step_generator,
    sum_stats,
)

PRESETS = {
    "ppo": {},
    "a2c": {"ppo_epochs": 1, "num_minibatches": 1, "clip": float("inf"), "value_clip": 0.0},
}

CURVES = ["score", "kl", "non_score_reward", "beta", "entropy", "approx_kl", "policy_clipfrac", "value_clipfrac",
          "value_loss", "explained_variance", "response_length", "eos_rate", "ptx_loss"]


@dataclass
class PPOConfig(RunArgs, OptimArgs, DataArgs, ModelArgs, SamplingArgs, CorrectionArgs, KLArgs, MonitorArgs):
    """PPO actor-critic RLHF against a reward, with a per-token KL penalty to the reference."""

    preset: Literal["ppo", "a2c"] = "ppo"
    """'a2c': one epoch, one minibatch, no clipping (the advantage actor-critic of seed 004)."""
    critic: str = ""
    """Backbone of the value model ('' : the reward model when --reward is one, else the policy's model)."""
    shared_trunk: bool = False
    """The value head on the policy's own trunk instead of a second backbone: one forward pass gives the
    logits and the values, and the value loss trains the policy's weights (or adapter) too. Less memory
    and compute; --critic and --critic-checkpointing then do not apply."""
    critic_checkpointing: bool = True
    """Recompute the critic's activations in the backward pass instead of keeping them: the update then
    holds one model's activations at a time, not two (one more critic forward per micro-batch; the
    gradients are the same)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_minibatches: int = 1
    """Optimiser steps per PPO epoch (the rollout batch is split into this many shuffled minibatches)."""
    clip: float = 0.2
    """Policy ratio clip range epsilon."""
    clip_high: float = -1.0
    """Upper clip range (DAPO clip-higher; -1: same as --clip)."""
    value_clip: float = 0.2
    """Value clip range around the rollout's values (0: no value clipping)."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (loss -= coef * entropy)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (without the mean shift) before GAE."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch's response tokens."""
    loss_aggregation: Literal["token", "sequence", "constant"] = "token"
    """How token losses are averaged: over all tokens of the step, per sequence, or by a constant."""
    ptx_data: str = ""
    """PPO-ptx: demonstrations whose SFT loss is mixed in (InstructGPT)."""
    ptx_coef: float = 0.0
    """Weight of the ptx SFT loss."""
    batch_size: int = 16
    """Prompts per PPO step (over all processes)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass."""
    lr: float = 1e-5
    """Peak learning rate (policy and critic)."""
    max_steps: int = 30
    """PPO steps (rollout + update); 0: one pass over the prompts per --epochs."""
    max_length: int = 512
    """Prompt plus response tokens."""
    eval_size: float = 64
    """Prompts held out of --train for the final comparison with the reference."""

    def resolve(self) -> PPOConfig:
        """The preset's fields, then the checks: one place for the CLI and the pipeline."""
        for key, value in PRESETS[self.preset].items():
            setattr(self, key, value)
        if not self.train:
            raise ConfigError("ppo: --train PROMPTS is required")
        if not self.reward:
            raise ConfigError("ppo: --reward is required (a reward-model folder, rule:FILE.yaml or an http(s) URL)")
        if self.ptx_coef and not self.ptx_data:
            raise ConfigError("ppo: --ptx-coef needs --ptx-data FILE (demonstrations)")
        return self


class ActorCritic(nn.Module):
    """Policy and value model as one module, so one optimiser and one DDP wrapper see both."""

    def __init__(self, policy, critic, checkpoint_critic: bool = False, kernels=contextlib.nullcontext):
        super().__init__()
        self.policy, self.critic, self.checkpoint_critic = policy, critic, checkpoint_critic
        self.kernels = kernels  # the stage's CPU kernels, entered again around the critic's recomputation

    def forward(self, rollout: Rollout, temperature: float, lm_batch: dict | None = None):
        if isinstance(self.critic, TrunkValueHead):  # one pass: the logits and the hidden states under them
            logits, hidden = response_logits(self.policy, rollout, temperature, hidden=True)
            values = self.critic.head(hidden)[..., 0].float() * rollout.response_mask
        else:
            # the critic runs first: the backward pass reaches it last, after the policy's backward has freed
            # the policy's activations, and with checkpointing only then recomputes the critic's
            if self.checkpoint_critic:
                values = checkpoint(self._values, rollout, use_reentrant=False)
            else:
                values = response_values(self.critic, rollout)
            logits = response_logits(self.policy, rollout, temperature)
        lm_logits = self.policy(**lm_batch, use_cache=False).logits if lm_batch is not None else None
        return logits, values, lm_logits

    def _values(self, rollout: Rollout):
        """The critic's values, the same kernels in the forward pass and in its recomputation (the
        backward pass runs outside the stage's TorchFunctionMode)."""
        with self.kernels():
            return response_values(self.critic, rollout)


class TrunkValueHead(nn.Module):
    """A zero-initialised scalar head on the policy's final hidden states (``--shared-trunk``). It owns only
    the head: the trunk is the policy, held outside the module tree so that its weights are registered
    (and saved) once, under the policy. Called like a reward model: (B, T) ids -> (B, T, 1) values."""

    def __init__(self, policy):
        super().__init__()
        self._trunk = [policy]
        self.head = nn.Linear(policy.config.hidden_size, 1, bias=False)
        init_reward_head(self.head, zero=True)

    def forward(self, input_ids, attention_mask, position_ids=None):
        out = self._trunk[0](input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False, logits_to_keep=1, output_hidden_states=True)
        return self.head(out.hidden_states[-1])


def load_critic(cfg):
    """The value model: the reward model's (or policy's) backbone with a zero-initialised scalar head
    (reference §1c item 11), prepared like the policy (LoRA or frozen layers, dropout off)."""
    spec = cfg.critic or single_reward_model(cfg.reward) or cfg.model
    critic, _ = load_reward_model(spec, num_labels=1, seed=cfg.seed, quantization=quantization(cfg))
    init_reward_head(critic.hf.score, zero=True)
    setattr(critic.hf.config, BIAS_KEY, 0.0)
    critic.hf = prepare_model(critic.hf, cfg, modules_to_save=["score"])
    return critic, spec


def ppo_loss(logits, values, tokens, old_logp, old_values, advantages, returns, is_weight, mask, cfg, total):
    """The PPO objective of one micro-batch, and its statistics as sums.

        L = agg(is_weight * L_clip) + vf_coef * agg(L_V) - entropy_coef * agg(H)

    ``total`` is the aggregation denominator over the whole minibatch (losses/ppo.py)."""
    logp = gather_logprobs(logits, tokens)
    clip_high = None if cfg.clip_high < 0 else cfg.clip_high
    pg, ratio, pg_clipped = policy_loss(logp, old_logp, advantages, cfg.clip, clip_high)
    pg = is_weight * pg
    vf, vf_clipped = value_loss(values, old_values, returns, cfg.value_clip)
    ent = entropy(logits if cfg.entropy_coef else logits.detach())  # logged; in the graph only when it is a loss term
    mode = cfg.loss_aggregation
    loss = aggregate(pg, mask, mode, total) + cfg.vf_coef * aggregate(vf, mask, mode, total)
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * aggregate(ent, mask, mode, total)
    d = (logp - old_logp).detach()
    stats = {"policy_loss": (pg * mask).sum(), "value_loss": (vf * mask).sum(), "entropy": (ent * mask).sum(),
             "approx_kl": (0.5 * d ** 2 * mask).sum(), "policy_clipfrac": (pg_clipped * mask).sum(),
             "value_clipfrac": (vf_clipped * mask).sum(), "ratio": (ratio * mask).sum(), "tokens": mask.sum()}
    return loss, {k: v.detach().float() for k, v in stats.items()}


def run(cfg: PPOConfig) -> Run:
    cfg.resolve()
    s = start_rl(cfg, "ppo", inputs={"ptx": cfg.ptx_data})
    accelerator, tokenizer, reference, reward = s.accelerator, s.tokenizer, s.reference, s.reward
    with stop_on_nonfinite(s.run):
        # 0. the other two roles: the critic, and (PPO-ptx) demonstrations
        if cfg.shared_trunk:
            critic = TrunkValueHead(s.policy)
            s.log("critic: a zero-initialised value head on the policy's trunk")
        else:
            critic, critic_spec = load_critic(cfg)
            s.log(f"critic: {critic_spec} with a zero-initialised value head")
        ptx = load_ptx(cfg, s.tokenizer) if cfg.ptx_coef else None
        def kernels_of_stage():  # the trainer's passes: oneDNN for fp32 linears on a CPU
            return cpu_kernels(accelerator.device, cfg.gradient_checkpointing)

        kernels = kernels_of_stage()
        actor_critic = ActorCritic(s.policy, critic, cfg.critic_checkpointing, kernels_of_stage)
        model, optimizer, scheduler, start, inner = prepare_rl(s, cfg, actor_critic, policy_of=lambda m: m.policy)
        T, world = cfg.temperature, accelerator.num_processes

        bar = progress(range(start, s.steps), accelerator.is_main_process and cfg.progress, "ppo", start, s.steps)
        for step in bar:
            g = step_generator(cfg, step, accelerator.process_index)
            with accelerator.autocast(), gathered(accelerator, model):  # sharded weights: whole for sampling
                # 1. rollout, and # 3. score (the reward source reads the decoded text)
                idx = s.plan.micro_batches(step)[0]
                batch = rollout_phase(s.engine, tokenizer, reward, s.prompts, idx, 1, cfg,
                                      row_generators(cfg, step, accelerator.process_index, len(idx)))
                ro, mask = batch.rollout, batch.rollout.response_mask.float()
                # 2. logprobs of the policy (pi_old) and the reference at T, and the critic's values
                t0 = time.perf_counter()
                with kernels:
                    old_logp, ref_logp, old_values = logprob_phase(inner.policy, reference, ro, T,
                                                                   cfg.micro_batch_size, inner.critic)
                t_logprobs = time.perf_counter() - t0
            # the engine sampled from its own numerics: importance weights pi_old / pi_engine
            is_weight, correction = engine_correction(cfg, ro, old_logp, mask)

            # 4. rewards = score - beta * KL (per token; the score lands on the EOS token)
            kl = kl_penalty(old_logp, ref_logp, cfg.kl_estimator) * mask
            rewards = token_rewards(batch.scores, kl, s.kl_ctl.beta, mask)
            if cfg.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)
            # 5. advantages (GAE) and value targets, before whitening the advantages
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = whiten(advantages, mask)

            # 6. PPO epochs: shuffled minibatches, one optimiser step each, micro-batches accumulated
            t0 = time.perf_counter()
            sums: dict = {}
            ptx_losses: list[float] = []
            for micro in minibatches(len(mask), cfg.ppo_epochs, cfg.num_minibatches, cfg.micro_batch_size, g):
                total = loss_total(accelerator, mask, micro, cfg.loss_aggregation)
                for j, i in enumerate(micro):
                    sub = ro.select(i)
                    w = sub.response_ids.shape[1]
                    lm = next(ptx) if ptx is not None and j == 0 else None
                    with accelerator.accumulate(model), kernels:
                        logits, values, lm_logits = model(sub, T, lm["batch"] if lm else None)
                        loss, stats = ppo_loss(logits, values, sub.response_ids, old_logp[i, :w], old_values[i, :w],
                                               advantages[i, :w], returns[i, :w], is_weight[i, :w], mask[i, :w], cfg, total)
                        if lm is not None:  # PPO-ptx: the SFT loss on demonstrations, once per minibatch
                            ptx_loss = sft_loss(lm_logits, lm["batch"]["labels"], lm["tokens"] * world)
                            loss = loss + cfg.ptx_coef * ptx_loss
                            ptx_losses.append(ptx_loss.item() * world)
                        backward(accelerator, loss)
                    if not sums:  # pi = pi_old exactly here: the ratio must be 1 (reference §3 'Checks')
                        first_ratio = (stats["ratio"] / stats["tokens"].clamp(min=1)).item()
                    sum_stats(sums, stats)
                grad_norm, lr = optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm, step + 1)
            s.engine.sync_weights(inner.policy)

            # 7. KL controller (on the mean summed k1 of the batch) and logging
            metrics = rollout_metrics(accelerator, batch, old_logp, ref_logp, mask, s.kl_ctl.beta, correction)
            s.kl_ctl.update(metrics["kl"], cfg.batch_size)
            metrics.update(mean_stats(accelerator, sums), ratio_first_minibatch=first_ratio,
                           explained_variance=explained_variance(old_values, returns, mask),
                           lr=lr, grad_norm=grad_norm, **batch.seconds, time_logprobs=t_logprobs,
                           time_train=time.perf_counter() - t0)
            if ptx_losses:
                metrics["ptx_loss"] = sum(ptx_losses) / len(ptx_losses)
            if len(reward.parts) > 1:
                metrics.update({f"reward/{k}": v for k, v in reward.last_terms.items()})
            end_step(s, cfg, bar, step, metrics, batch)

        if not shards_parameters(accelerator):  # (sharded, its shards are part of the model final/ is gathered from)
            inner.critic = None  # trained and checkpointed; not needed for the comparison or final/: freed
        return finish(s, cfg, inner.policy, CURVES)


def load_ptx(cfg, tokenizer):
    """An endless iterator of demonstration micro-batches for PPO-ptx: {"batch": tensors, "tokens": count}."""
    records = load_records(cfg.ptx_data, kind="demonstration", fields=cfg.fields).records
    examples, _ = encode_examples(tokenizer, [(r.prompt, r.response, r.source) for r in records], cfg.max_length, cfg.truncation)
    rng = random.Random(cfg.seed)

    def batches():
        for _ in itertools.count():
            order = list(range(len(examples)))
            rng.shuffle(order)
            for i in range(0, len(order) - cfg.micro_batch_size + 1, cfg.micro_batch_size):
                chunk = [examples[j] for j in order[i: i + cfg.micro_batch_size]]
                batch = collate(chunk, tokenizer.pad_token_id, packing=False)
                yield {"batch": batch, "tokens": max(int((batch["labels"][:, 1:] != -100).sum()), 1)}

    return batches()
