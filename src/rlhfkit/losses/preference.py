"""Reward-model losses from comparisons (seed 002 §"Bradley-Terry" onwards; reference §6).

r_c, r_r are the scalar rewards of the chosen and rejected responses; every function returns the
mean over the batch so it can be summed with other terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry pairwise loss (seed 002 eq. 15; Ouyang et al. 2022; Stiennon et al. 2020):

        L = -log sigma(r_c - r_r)  =  log(1 + exp(r_r - r_c))     (eq. 16, the same function)

    r_chosen, r_rejected: (B,) -> scalar mean over B.
    """
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def margin_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry with a margin (seed 002 eq. 17; Llama 2, Touvron et al. 2023, arXiv 2307.09288):

        L = -log sigma(r_c - r_r - m(y_c, y_r))

    m is larger for stronger preferences (Llama 2 uses 3/2/1/0 for "significantly/better/slightly/
    negligibly better"), so a clear preference must be separated by more. margin: (B,).
    """
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def per_prompt_pairs(rewards: torch.Tensor, mask: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """All C(K,2) comparisons of one prompt as one batch element (seed 002 eq. 18; InstructGPT,
    Ouyang et al. 2022 §3.5):

        L(x) = -1/C(K,2) * sum_{i<j} log sigma(r(x, y_i) - r(x, y_j))

    with y_1 ≻ y_2 ≻ ... ≻ y_K. Each completion gets one forward pass and the prompt's pairs share it,
    so a prompt with many pairs does not dominate the epoch or over-fit.

    rewards: (B, K) ordered best first; mask: (B, K) true for real completions (prompts may have
    different K). With ``labels`` (B, K), graded rather than ordered completions (e.g. an outcome RM's
    correct 1 / wrong 0), the pairs are every (i, j) with label_i > label_j, and C(K,2) becomes their
    count; completions with equal labels are not compared. Returns the mean of L(x) over the B
    prompts (a prompt without a pair adds 0).
    """
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    if labels is None:  # ordered best first
        labels = -torch.arange(rewards.shape[1], device=rewards.device).expand_as(rewards)
    diff = rewards[:, :, None] - rewards[:, None, :]  # (B, K, K): r_i - r_j
    pair = (labels[:, :, None] > labels[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    n_pairs = pair.sum((1, 2)).clamp(min=1)
    per_prompt = -(F.logsigmoid(diff) * pair).sum((1, 2)) / n_pairs
    return per_prompt.mean()


def plackett_luce(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plackett-Luce K-wise ranking loss (seed 002 eq. 19; Zhu, Jordan, Jiao 2023, arXiv 2301.11270):

        P(tau | x) = prod_{k=1..K} exp(r_tau(k)) / sum_{j=k..K} exp(r_tau(j))
        L = -log P(tau | x) = -sum_k [ r_tau(k) - logsumexp_{j>=k} r_tau(j) ]

    At K = 2 this is -log sigma(r_1 - r_2), Bradley-Terry. rewards: (B, K) ordered best first;
    mask: (B, K) true for real completions (padding at the end). Returns the mean over B.
    """
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    masked = rewards.masked_fill(~mask, float("-inf"))
    # logsumexp over the suffix j >= k: flip, cumulative logsumexp, flip back
    suffix = torch.logcumsumexp(masked.flip(1), dim=1).flip(1)
    terms = torch.where(mask, rewards - suffix, torch.zeros_like(rewards))
    return -terms.sum(1).mean()


def centering(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Reward-centring auxiliary loss (Eisenstein et al. 2023, arXiv 2312.09244, eq. 2):

        L_aux = mean((r_c + r_r)^2)

    added with a small coefficient (TRL's ``center_rewards_coefficient``, recommended 0.01) so the
    rewards stay centred around 0 instead of drifting (reference §8 item 14).
    """
    return ((r_chosen + r_rejected) ** 2).mean()
