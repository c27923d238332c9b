"""Reward-model losses from absolute labels: ratings (seed 004 §3.2), outcome labels (ORM,
seed 002 eq. 20) and step labels (PRM, seed 002 eq. 21), plus PRM score aggregation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Ordinal classes for ratings: bad < mid < good.
CLASSES = ("bad", "mid", "good")


def rating_regression(rewards: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
    """Regression of the reward on a rating (seed 004 §3.2, "回归模型"):

        L = mean((r(x, y) - s)^2)

    with s the rating standardised by the caller (e.g. a 1-7 Likert score mapped to mean 0, std 1).
    rewards, ratings: (B,).
    """
    return F.mse_loss(rewards, ratings)


def ordinal_classes(ratings: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Bucket ratings into 0 = bad (< low), 1 = mid, 2 = good (> high)."""
    return (ratings >= low).long() + (ratings > high).long()


def rating_classification(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Classification of a response into bad / mid / good (seed 004 §3.2, "分类模型"):

        L = -mean log softmax(z)[c]

    logits: (B, 3) class scores; classes: (B,) in {0, 1, 2}. The reward used downstream is the
    expected class under softmax(z): r = p_good - p_bad (see :func:`class_reward`).
    """
    return F.cross_entropy(logits, classes)


def class_reward(logits: torch.Tensor) -> torch.Tensor:
    """Scalar reward from bad/mid/good logits: P(good) - P(bad), in [-1, 1]. (B, 3) -> (B,)."""
    p = logits.softmax(-1)
    return p[:, 2] - p[:, 0]


def orm_bce(token_logits: torch.Tensor, correct: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Outcome reward model loss (seed 002 eq. 20; Cobbe et al. 2021, arXiv 2110.14168):

        L = -mean_{b, t in completion} [ y_b log p_{b,t} + (1 - y_b) log(1 - p_{b,t}) ],  p = sigma(z)

    The solution's correctness label y_b supervises the head at **every completion token** (Cobbe's
    token-level verifier beat the solution-level one); at test time the final token's p ranks
    solutions. token_logits: (B, T); correct: (B,) in {0, 1}; mask: (B, T) true on completion tokens.
    The mean is over all supervised tokens of the batch.
    """
    target = correct[:, None].float().expand_as(token_logits)
    bce = F.binary_cross_entropy_with_logits(token_logits.float(), target, reduction="none")
    return (bce * mask).sum() / mask.sum().clamp(min=1)


def prm_cross_entropy(step_logits: torch.Tensor, step_labels: torch.Tensor) -> torch.Tensor:
    """Process reward model loss (seed 002 eq. 21; Lightman et al. 2023, arXiv 2305.20050):
    a 3-class cross-entropy at the last token of each step,

        L = -mean_{steps s with a label} log softmax(z_s)[c_s],   c in {0: wrong, 1: neutral, 2: correct}

    (eq. 21 is its binary special case). Steps after the first mistake carry no label (-100) and are
    not supervised. step_logits: (S, 3) for every step in the batch; step_labels: (S,) in
    {0, 1, 2, -100}.
    """
    return F.cross_entropy(step_logits.float(), step_labels, ignore_index=-100)


def prm_aggregate(p_correct: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Solution score from per-step probabilities that the step is correct (reference §6):

    - ``product``: P(all steps correct) = prod_k p_k (Lightman et al. 2023);
    - ``min``: min_k p_k (Math-Shepherd, Wang et al. 2023, arXiv 2312.08935);
    - ``last``: p_K, the last step's (Snell et al. 2024, arXiv 2408.03314).

    p_correct: (B, S) padded; mask: (B, S) true on real steps. -> (B,).
    """
    if how == "product":
        return torch.where(mask, p_correct, torch.ones_like(p_correct)).prod(-1)
    if how == "min":
        return torch.where(mask, p_correct, torch.ones_like(p_correct)).min(-1).values
    if how == "last":
        last = mask.long().cumsum(-1).argmax(-1)  # index of the last real step
        return p_correct.gather(-1, last[:, None]).squeeze(-1)
    raise ValueError(f"aggregation must be product, min or last, got {how!r}")
