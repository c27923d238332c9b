"""Evaluation metrics as pure functions on plain sequences (reference §7), and the text statistics of
samples the policy evaluation and the RL monitors report."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from rlhfkit.rollout.rewards import repetition_rate, words


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """mean[r_c > r_r]: strict, so a tie counts as wrong (RewardBench ``rewardbench.py``)."""
    return sum(c > r for c, r in zip(chosen, rejected)) / max(len(chosen), 1)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def reliability(chosen: Sequence[float], rejected: Sequence[float], bins: int = 10):
    """Calibration of the Bradley-Terry probability p = sigma(r_c - r_r).

    Every pair enters in both orders, as (p, 1) and (1 - p, 0), so the outcomes are balanced and
    a perfectly calibrated model has frequency = confidence in every bin. Returns (ECE, rows) with
    rows (bin low, bin high, mean confidence, frequency, count):

        ECE = sum_bins (n_bin / N) * |frequency_bin - confidence_bin|
    """
    points = []
    for c, r in zip(chosen, rejected):
        p = sigmoid(c - r)
        points += [(p, 1.0), (1 - p, 0.0)]
    rows, ece = [], 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(p, y) for p, y in points if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if not inside:
            continue
        conf = sum(p for p, _ in inside) / len(inside)
        freq = sum(y for _, y in inside) / len(inside)
        ece += len(inside) / len(points) * abs(freq - conf)
        rows.append((lo, hi, conf, freq, len(inside)))
    return ece, rows


def section_scores(subset_accuracy: dict[str, float], subset_counts: dict[str, int],
                   sections: dict[str, list[str]]) -> dict[str, float]:
    """RewardBench section weighting (reference §7.1): a section's score is the count-weighted mean
    of its subsets' accuracies, and ``overall`` the unweighted mean of the sections. ``subset_counts``
    may override real sizes (RewardBench up-weights math-prm to 984)."""
    out = {}
    for name, subsets in sections.items():
        present = [s for s in subsets if s in subset_accuracy]
        total = sum(subset_counts[s] for s in present)
        if total:
            out[name] = sum(subset_accuracy[s] * subset_counts[s] for s in present) / total
    if out:
        out["overall"] = sum(out.values()) / len(out)
    return out


def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative),
    ties counting 1/2 (the Mann-Whitney U statistic over n_pos * n_neg)."""
    pairs = sorted(zip(scores, labels))
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return float("nan")
    # average ranks with ties
    ranks = [0.0] * len(pairs)
    i = 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, (_, y) in zip(ranks, pairs) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def best_of_n_accuracy(groups: Sequence[Sequence[tuple[float, bool]]]) -> float:
    """Selection accuracy: for each group of (score, correct) candidates, the credit of picking the
    top score; ties at the top share it, 1/#ties each (RewardBench 2 ``reroll_and_score``)."""
    total = 0.0
    for g in groups:
        top = max(s for s, _ in g)
        winners = [ok for s, ok in g if s == top]
        total += sum(winners) / len(winners)
    return total / max(len(groups), 1)


def first_wrong_step(p_wrong: Sequence[float], threshold: float = 0.5) -> int | None:
    """The first step whose probability of being wrong exceeds ``threshold`` (None: no mistake)."""
    return next((i for i, p in enumerate(p_wrong) if p > threshold), None)


def bootstrap_ci(values: Sequence[float], n: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    import random

    rng = random.Random(seed)
    k = len(values)
    if k == 0:
        return (float("nan"), float("nan"))
    means = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return means[int(alpha / 2 * n)], means[min(n - 1, int((1 - alpha / 2) * n))]


# ---------------------------------------------------------------------------------------------
# text statistics of samples (length, diversity, repetition)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams over all n-grams across ``texts``; 1 when no
    n-gram repeats, towards 0 when every response says the same thing.

    >>> distinct_n(["a b c", "a b d"], 2)
    0.75
    """
    grams = [tuple(w[i: i + n]) for t in texts for w in [words(t)] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; 0 when either side is constant.

    >>> round(pearson([1, 2, 3], [2, 4, 7]), 4)
    0.9934
    """
    n = len(x)
    if n < 2:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def sample_stats(texts: list[str]) -> dict:
    """Length (words) mean / median / max, distinct-1 and distinct-2, and the mean repetition rate."""
    lengths = [len(words(t)) for t in texts] or [0]
    return {"words_mean": sum(lengths) / len(lengths), "words_median": statistics.median(lengths),
            "words_max": max(lengths), "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "repetition": sum(repetition_rate(t) for t in texts) / max(len(texts), 1)}
