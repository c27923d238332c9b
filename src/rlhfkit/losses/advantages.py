"""Per-token rewards, whitening, GAE and the critic-free advantage estimators (reference §1c, §3, §4).

Shapes: B sequences, T response positions; ``mask`` (B, T) is 1 on response tokens up to and
including EOS and 0 on the padding after it. Everything that reads statistics (means, variances)
reads them over ``mask`` only, so padding never leaks into them (reference §8 item 7).
Group estimators take rewards as (P, G): P prompts with G samples each.
"""

from __future__ import annotations

import torch

from rlhfkit.models.reward import last_token_index


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean of x over mask == 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of x over mask == 1. Biased (divide by n) by default, as ``tf.nn.moments`` in
    lm-human-preferences; ``unbiased=True`` is TRL's Bessel-corrected ``masked_var`` (reference §8 item 12)."""
    n = mask.sum()
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return var * n / (n - 1).clamp(min=1) if unbiased else var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, unbiased: bool = False,
           eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) * rsqrt(var + eps) over the mask, 0 on padding. ``shift_mean=False`` adds the mean back
    (rewards are whitened that way; advantages with the shift) (reference §1c item 17)."""
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask, unbiased) + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_rewards(score: torch.Tensor, kl: torch.Tensor, beta: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token reward of KL-in-reward RLHF (Ziegler et al. 2019; reference §1c item 16, §2.2):

        r_t = -beta * kl_t  +  1[t = last response token] * score

    The score lands on the EOS (or the last token of a truncated response), never on padding
    (reference §8 item 2), and an empty response gets nothing. score: (B,); kl, mask: (B, T)."""
    rewards = -beta * kl * mask
    has = mask.sum(-1) > 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    rewards[rows, last_token_index(mask)[has]] += score[has].to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015) over response tokens, V after the last token = 0:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lambda * A_{t+1}          (computed backwards)
        R_t     = A_t + V_t                                  (value targets, before any whitening)

    Positions with mask 0 have no value and no advantage. Returns (advantages, returns), both (B, T)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over the response (REINFORCE returns; seed 003)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


# ---------------------------------------------------------------------------------------------
# critic-free, one advantage per sequence. rewards: (P, G) -> advantages (P, G)


def reinforce_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline (Williams 1992): A = R - mean(R) over the whole batch."""
    return rewards - rewards.mean()


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): each sample's baseline is the mean of the other G-1
    of its prompt,

        A_i = R_i - 1/(G-1) * sum_{j != i} R_j = G/(G-1) * (R_i - mean_j R_j).

    A group of one has no baseline: A = 0."""
    g = rewards.shape[1]
    if g < 2:
        return torch.zeros_like(rewards)
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (g - 1)
    return rewards - baseline


def grpo_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024): A_i = (R_i - mean(R)) / (std(R) + eps) within each
    prompt's group, std with Bessel's correction and eps = 1e-4 as TRL. ``scale=False`` is Dr. GRPO
    (Liu et al. 2025), which drops the std (its question-difficulty bias): A_i = R_i - mean(R).
    A group whose rewards are all equal, or of size 1, gets A = 0 (reference §8 item 12)."""
    centred = rewards - rewards.mean(1, keepdim=True)
    if not scale or rewards.shape[1] < 2:
        return centred
    return centred / (rewards.std(1, keepdim=True) + eps)
