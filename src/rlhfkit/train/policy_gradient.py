"""Critic-free policy gradient (``rlhfkit pg --estimator reinforce|rloo|grpo|dr_grpo``).

k samples per prompt; the baseline comes from the samples themselves instead of a value model
(reference §4). Each step::

    # 1. rollout       k responses per prompt
    # 2. logprobs      pi_old and pi_ref at the sampling temperature
    # 3. score         reward source, missing-EOS penalty
    # 4. rewards       R_i = score_i - beta * sum_t KL_t    (--kl-in reward; with --kl-in loss the KL
    #                  term goes into the loss instead, GRPO-style)
    # 5. advantages    one per sequence: reinforce (batch-mean baseline), rloo (leave-one-out),
    #                  grpo ((R - mean) / std in the group), dr_grpo (R - mean); the same for every token
    # 6. update        PPO-clipped surrogate over --ppo-epochs (1: plain on-policy policy gradient)

KL in the loss (reference §2.2): E[grad k1] = 0 on-policy, so k1 there regularises nothing; k3 (GRPO's
choice) follows the gradient of the *forward* KL(pi_ref || pi); k2's gradient is the reverse KL's.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Literal

from rlhfkit.config import DataArgs, ModelArgs, OptimArgs, RunArgs
from rlhfkit.errors import ConfigError
from rlhfkit.eval.monitors import MonitorArgs
from rlhfkit.losses.advantages import grpo_advantages, reinforce_advantages, rloo_advantages
from rlhfkit.losses.kl import kl_penalty
from rlhfkit.losses.ppo import aggregate, entropy, policy_loss
from rlhfkit.platform.distributed import gathered
from rlhfkit.platform.kernels import cpu_kernels
from rlhfkit.rollout.phase import SamplingArgs, rollout_phase
from rlhfkit.rollout.sampler import gather_logprobs, response_logits
from rlhfkit.run import Run, progress
from rlhfkit.train.common import backward, optimizer_step, stop_on_nonfinite
from rlhfkit.train.rl import (
    CorrectionArgs,
    KLArgs,
    end_step,
    engine_correction,
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

ESTIMATORS = {
    "reinforce": reinforce_advantages,
    "rloo": rloo_advantages,
    "grpo": grpo_advantages,
    "dr_grpo": lambda r: grpo_advantages(r, scale=False),
}
# each estimator's paper aggregates token losses its own way (reference §4)
DEFAULT_AGGREGATION = {"reinforce": "token", "rloo": "token", "grpo": "sequence", "dr_grpo": "constant"}

CURVES = ["score", "kl", "non_score_reward", "beta", "entropy", "approx_kl", "policy_clipfrac", "advantage_std",
          "response_length", "eos_rate", "zero_advantage_groups"]


@dataclass
class PGConfig(RunArgs, OptimArgs, DataArgs, ModelArgs, SamplingArgs, CorrectionArgs, KLArgs, MonitorArgs):
    """Critic-free policy gradient: REINFORCE, RLOO, GRPO or Dr. GRPO, with a KL tether to the reference."""

    estimator: Literal["reinforce", "rloo", "grpo", "dr_grpo"] = "rloo"
    """Advantage estimator (reference §4)."""
    samples_per_prompt: int = 4
    """k responses per prompt (the group)."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Put the KL penalty in the sequence reward (RLOO, REINFORCE) or in the loss (GRPO; use k3 or k2)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch (1: on-policy, the ratio stays 1)."""
    num_minibatches: int = 1
    """Optimiser steps per epoch."""
    clip: float = 0.2
    """Ratio clip range when --ppo-epochs > 1."""
    clip_high: float = -1.0
    """Upper clip range (DAPO clip-higher; -1: same as --clip)."""
    loss_aggregation: Literal["auto", "token", "sequence", "constant"] = "auto"
    """Token losses averaged over all tokens, per sequence, or by a constant; 'auto' is the estimator's
    paper: grpo sequence, dr_grpo constant, the others token."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus."""
    batch_size: int = 8
    """Prompts per step (over all processes); the step has batch_size x samples_per_prompt responses."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass."""
    share_prefix: bool = True
    """Compute each prompt once for its k samples in the teacher-forced passes: a group's prompt and its k
    responses go in one packed row, so every micro-batch holds whole groups and minibatches are drawn
    group by group. Needs --micro-batch-size a multiple of --samples-per-prompt. Off: one row per response."""
    lr: float = 1e-5
    """Peak learning rate."""
    max_steps: int = 30
    """Steps (rollout + update); 0: one pass over the prompts per --epochs."""
    eval_size: float = 64
    """Prompts held out of --train for the final comparison with the reference."""

    def resolve(self) -> PGConfig:
        if not self.train:
            raise ConfigError("pg: --train PROMPTS is required")
        if not self.reward:
            raise ConfigError("pg: --reward is required (a reward-model folder, rule:FILE.yaml or an http(s) URL)")
        if self.samples_per_prompt < 1:
            raise ConfigError("pg: --samples-per-prompt must be at least 1")
        if self.share_prefix and self.micro_batch_size % self.samples_per_prompt:
            raise ConfigError(f"pg: --share-prefix needs --micro-batch-size ({self.micro_batch_size}) to be a multiple "
                              f"of --samples-per-prompt ({self.samples_per_prompt}); or --no-share-prefix")
        if self.kl_in == "loss" and self.kl_estimator == "k1" and self.beta:
            warnings.warn("--kl-in loss with k1: its gradient is zero in expectation on-policy (reference §2.2); "
                          "use --kl-estimator k3 (GRPO) or k2", stacklevel=2)
        return self


def pg_loss(logits, logp, old_logp, ref_logp, advantages, is_weight, mask, cfg, beta: float, total):
    """One micro-batch's loss from its logits (B, R, V) and the sampled tokens' logprobs under them
    (B, R): agg(is_weight * PPO-clip with sequence advantages) [+ beta * agg(KL_t) with --kl-in loss]
    [- entropy_coef * agg(H)]. Returns (loss, summed statistics)."""
    mode = aggregation(cfg)
    adv = advantages[:, None].expand_as(logp)
    pg, ratio, clipped = policy_loss(logp, old_logp, adv, cfg.clip, None if cfg.clip_high < 0 else cfg.clip_high)
    pg = is_weight * pg
    loss = aggregate(pg, mask, mode, total)
    stats = {"policy_loss": (pg * mask).sum(), "approx_kl": (0.5 * (logp - old_logp) ** 2 * mask).sum(),
             "policy_clipfrac": (clipped * mask).sum(), "ratio": (ratio * mask).sum(), "tokens": mask.sum()}
    if cfg.kl_in == "loss":
        kl = kl_penalty(logp, ref_logp, cfg.kl_estimator)
        loss = loss + beta * aggregate(kl, mask, mode, total)
        stats["kl_loss"] = (kl * mask).sum()
    ent = entropy(logits if cfg.entropy_coef else logits.detach())  # logged; in the graph only when it is a loss term
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * aggregate(ent, mask, mode, total)
    stats["entropy"] = (ent * mask).sum()
    return loss, {k: v.detach().float() for k, v in stats.items()}


def aggregation(cfg: PGConfig) -> str:
    return DEFAULT_AGGREGATION[cfg.estimator] if cfg.loss_aggregation == "auto" else cfg.loss_aggregation


def run(cfg: PGConfig) -> Run:
    cfg.resolve()
    k = cfg.samples_per_prompt
    s = start_rl(cfg, "pg", k)
    accelerator, tokenizer, reference, reward = s.accelerator, s.tokenizer, s.reference, s.reward
    with stop_on_nonfinite(s.run):
        model, optimizer, scheduler, start, inner = prepare_rl(s, cfg, s.policy)
        T, mode = cfg.temperature, aggregation(cfg)
        group = k if cfg.share_prefix else 1  # rows that share a prompt, packed in one row
        fused_old = cfg.kl_in == "loss" and cfg.ppo_epochs == 1 and cfg.num_minibatches == 1
        kernels = cpu_kernels(accelerator.device, cfg.gradient_checkpointing)  # the trainer's passes: oneDNN for fp32 linears on a CPU

        bar = progress(range(start, s.steps), accelerator.is_main_process and cfg.progress, f"pg {cfg.estimator}",
                       start, s.steps)
        for step in bar:
            g = step_generator(cfg, step, accelerator.process_index)
            with accelerator.autocast(), gathered(accelerator, model):  # sharded weights: whole for sampling
                # 1. rollout: k samples per prompt, and # 3. score
                idx = s.plan.micro_batches(step)[0]
                batch = rollout_phase(s.engine, tokenizer, reward, s.prompts, idx, k, cfg,
                                      row_generators(cfg, step, accelerator.process_index, len(idx) * k))
                ro, mask = batch.rollout, batch.rollout.response_mask.float()
                # 2. logprobs of pi_old and pi_ref at T. With one update on fresh samples and the KL in the
                # loss, nothing needs pi_old before the update: its own forward gives it (detached), as in TRL
                t0 = time.perf_counter()
                with kernels:
                    old_logp, ref_logp, _ = logprob_phase(inner, reference, ro, T, cfg.micro_batch_size, group=group,
                                                          old_too=not fused_old)
                t_logprobs = time.perf_counter() - t0
            # the engine sampled from its own numerics: importance weights pi_old / pi_engine (fused_old: below)
            is_weight, correction = engine_correction(cfg, ro, old_logp, mask) if not fused_old else (mask.clone(), {})

            # 4. sequence rewards: R = score - beta * sum_t KL_t (KL in the reward), or the score alone
            beta = s.kl_ctl.beta
            seq_reward = batch.scores.clone()
            if cfg.kl_in == "reward":
                seq_reward -= beta * (kl_penalty(old_logp, ref_logp, cfg.kl_estimator) * mask).sum(-1)
            # 5. one advantage per sequence from its group of k
            advantages = ESTIMATORS[cfg.estimator](seq_reward.view(-1, k)).reshape(-1)

            # 6. policy update
            t0 = time.perf_counter()
            sums: dict = {}
            for micro in minibatches(len(mask), cfg.ppo_epochs, cfg.num_minibatches, cfg.micro_batch_size, g, group):
                total = loss_total(accelerator, mask, micro, mode)
                for i in micro:
                    sub = ro.select(i)
                    w = sub.response_ids.shape[1]
                    with accelerator.accumulate(model), kernels:
                        logits = response_logits(model, sub, T, group)
                        logp = gather_logprobs(logits, sub.response_ids)
                        if fused_old:  # pi_old is this forward: the ratio is exactly 1
                            old_logp[i, :w] = logp.detach() * mask[i, :w]
                            is_weight[i, :w] = engine_correction(cfg, sub, old_logp[i, :w], mask[i, :w])[0]
                        loss, stats = pg_loss(logits, logp, old_logp[i, :w], ref_logp[i, :w], advantages[i],
                                              is_weight[i, :w], mask[i, :w], cfg, beta, total)
                        backward(accelerator, loss)
                    if not sums:  # pi = pi_old exactly here: the ratio must be 1 (reference §3 'Checks')
                        first_ratio = (stats["ratio"] / stats["tokens"].clamp(min=1)).item()
                    sum_stats(sums, stats)
                grad_norm, lr = optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm, step + 1)
            s.engine.sync_weights(inner)
            if fused_old:
                _, correction = engine_correction(cfg, ro, old_logp, mask)

            # 7. KL controller and logging
            metrics = rollout_metrics(accelerator, batch, old_logp, ref_logp, mask, beta, correction)
            s.kl_ctl.update(metrics["kl"], cfg.batch_size * k)
            groups = seq_reward.view(-1, k)
            metrics.update(mean_stats(accelerator, sums), ratio_first_minibatch=first_ratio,
                           advantage_std=advantages.std().item() if len(advantages) > 1 else 0.0,
                           zero_advantage_groups=(groups.max(1).values == groups.min(1).values).float().mean().item(),
                           lr=lr, grad_norm=grad_norm, **batch.seconds, time_logprobs=t_logprobs,
                           time_train=time.perf_counter() - t0)
            end_step(s, cfg, bar, step, metrics, batch)

        return finish(s, cfg, inner, CURVES)
