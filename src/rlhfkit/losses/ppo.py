"""Policy-gradient losses: PPO's clipped surrogate, the clipped value loss, entropy, A2C, the
importance weight for engine/trainer mismatch, and how token losses are summed into one number
(reference §3, §4, §8 item 13).

All per-token functions take (B, T) tensors and return (B, T); :func:`aggregate` turns them into
a scalar. Its denominator is a count over the *whole optimiser step* (all micro-batches and
processes), so accumulation and data parallelism give the same gradient as one big batch
(reference §8 item 9).
"""

from __future__ import annotations

import torch


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float = 0.2,
                clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token:

        rho_t = exp(logp_t - old_logp_t)
        L_t   = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high))

    ``clip_high`` defaults to ``clip_low`` (DAPO's clip-higher uses 0.28); ``clip_low = inf`` turns
    clipping off. Returns (loss, ratio, clipped) where clipped marks tokens whose clipped branch
    was taken (the clip fraction)."""
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), ratio, (clipped > unclipped).float()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (baselines ppo2; reference §3), per token:

        V_clip = old_V + clip(V - old_V, -eps_v, eps_v)
        L_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)

    ``clip <= 0`` gives the plain 0.5 * (V - R)^2. Returns (loss, clipped)."""
    plain = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * plain, torch.zeros_like(plain)
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), (clipped > plain).float()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H_t = -sum_v p_v log p_v of the (temperature-scaled) next-token distribution: (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def a2c_policy_loss(logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Advantage actor-critic (Mnih et al. 2016; seed 004), per token: L_t = -A_t * log pi(a_t | s_t).

    Its gradient equals PPO's with one epoch and no clipping (-A * rho at rho = 1), which is how the
    ``a2c`` preset runs."""
    return -advantages * logp




def rollout_correction(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, cap: float = 2.0,
                       level: str = "token", mode: str = "truncate") -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weight for the mismatch between the rollout engine and the trainer, per token.

    The engine samples a_t from its own numerics, pi_engine (another kernel, precision or weight copy:
    vLLM), while the trainer's pi_old is recomputed teacher-forced. The samples are then off-policy
    for pi_old, and the policy loss is reweighted by (truncated importance sampling; Ionides 2008;
    Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training", TIS):

        w_t = pi_old(a_t | s_t) / pi_engine(a_t | s_t) = exp(old_logp_t - engine_logp_t)
        token:     rho_t = w_t
        sequence:  rho_t = exp(sum_t' (old_logp_t' - engine_logp_t'))      for every t of the sequence
        truncate:  weight_t = min(rho_t, C)                                   (TIS)
        mask:      weight_t = rho_t if 1/C <= rho_t <= C else 0               (MIS / IcePop)

    and L_t -> weight_t * L_t, with the weight a constant (no gradient). With an exact engine
    rho = 1 and nothing changes. Returns (weight, rho), each (B, T) and 0 on padding."""
    d = (old_logp - engine_logp).detach() * mask
    if level == "sequence":
        d = d.sum(-1, keepdim=True).expand_as(d)
    elif level != "token":
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    rho = torch.exp(d.clamp(-20.0, 20.0)) * mask
    if mode == "truncate":
        weight = rho.clamp(max=cap)
    elif mode == "mask":
        weight = torch.where((rho >= 1.0 / cap) & (rho <= cap), rho, torch.zeros_like(rho))
    else:
        raise ValueError(f"mode must be 'truncate' or 'mask', got {mode!r}")
    return weight * mask, rho


def aggregate(x: torch.Tensor, mask: torch.Tensor, mode: str, total: float | torch.Tensor) -> torch.Tensor:
    """Sum a per-token loss into this micro-batch's share of the step's loss.

    ``token`` (DAPO/TRL "dapo"):  sum_{i,t} x_it / N_tokens
    ``sequence`` (GRPO paper):    sum_i (1/|o_i|) sum_t x_it / N_sequences
    ``constant`` (Dr. GRPO):      sum_{i,t} x_it / (N_sequences * T_max)

    ``total`` is the matching count over the whole optimiser step (see :func:`aggregate_total`), so
    summing this over micro-batches gives the step's loss exactly."""
    if mode == "sequence":
        return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / total
    return (x * mask).sum() / total


def aggregate_total(masks: list[torch.Tensor], mode: str, max_len: int) -> float:
    """The denominator :func:`aggregate` needs, from the masks of every micro-batch of the step (on
    this process; reduce over processes for the global count)."""
    if mode == "token":
        return float(sum(m.sum() for m in masks))
    n = float(sum(m.shape[0] for m in masks))
    return n if mode == "sequence" else n * max_len
