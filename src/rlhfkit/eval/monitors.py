"""What to watch during RL (seed 001; Gao et al. 2022, *Scaling laws for reward model
over-optimization*): the policy games the reward model with longer or repetitive answers, the KL
spikes, the proxy reward rises while the true (gold) objective falls, and samples drift where the
reward model has never seen data, so its scores mean nothing.

* :class:`Monitor` turns each RL step's samples into metrics (``monitor/...`` in metrics.jsonl) and
  raises :class:`RewardHackingWarning` when an alarm fires; every alarm is also appended to the
  run's ``alarms.jsonl``.
* :class:`OODDetector` is a Mahalanobis detector (Lee et al. 2018, *A simple unified framework for
  detecting out-of-distribution samples*) on the reward model's own features (its last hidden state
  averaged over the response, as in Ren et al. 2023). It is fitted when the reward model is trained
  and saved beside it as ``ood.pt``.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.rollout.rewards import repetition_rate, words


class RewardHackingWarning(UserWarning):
    """An RL monitor alarm: possible reward hacking, a KL spike or off-distribution samples."""


# ---------------------------------------------------------------------------------------------
# small pure statistics


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


# ---------------------------------------------------------------------------------------------
# alarms


@dataclass
class MonitorArgs:
    monitor_window: int = 5
    """Steps per window: each alarm compares the latest window with an earlier one."""
    length_corr_alarm: float = 0.5
    """Alarm when the within-batch correlation of reward with response length, averaged over the latest
    window, exceeds this and has risen by at least 0.2 since the first window."""
    repetition_alarm: float = 0.05
    """Alarm when the mean repetition rate (repeated word 3-grams) of the latest window exceeds the first
    window's by this much."""
    kl_spike: float = 3.0
    """Alarm when a step's KL exceeds this many times the median of the previous full window (and 1 nat)."""
    ood_alarm: float = 0.25
    """Alarm when more than this fraction of a step's samples are off the reward model's training distribution."""
    gold: str = ""
    """A gold reward (same syntax as --reward) that is only watched, never optimised: the monitor alarms
    when the proxy rises while the gold falls (over-optimisation)."""


class Monitor:
    """Per-step sample statistics and the alarms of :class:`MonitorArgs`. ``observe`` returns the
    metrics to log (prefixed ``monitor/``) and raises :class:`RewardHackingWarning` for each alarm."""

    def __init__(self, args: MonitorArgs, run_dir: Path | None = None):
        self.args, self.run_dir = args, run_dir
        self.history: list[dict] = []

    def restore(self, rows: list[dict]) -> None:
        """Rebuild the history from a resumed run's logged metrics, so its alarms see the earlier steps."""
        self.history = [{"step": r["step"], "score": r["score"], "kl": r["kl"],
                         **{k.removeprefix("monitor/"): v for k, v in r.items() if k.startswith("monitor/")},
                         **({"gold": r["gold"]} if "gold" in r else {})} for r in rows if "score" in r and "kl" in r]

    def window_mean(self, key: str, start: int, end: int) -> float | None:
        values = [h[key] for h in self.history[start:end] if h.get(key) is not None]
        return sum(values) / len(values) if values else None

    def alarms(self) -> list[str]:
        """The alarms the latest step raises, as messages (pure: depends only on the history)."""
        a, h, w = self.args, self.history, self.args.monitor_window
        now, out = h[-1], []
        if len(h) >= 2 * w:
            first, last = self.window_mean("length_corr", 0, w), self.window_mean("length_corr", -w, None)
            if last > a.length_corr_alarm and last - first >= 0.2:
                out.append(f"reward-length correlation {last:.2f} over the last {w} steps (first {w}: {first:.2f}): "
                           "the reward may be paying for length")
            first, last = self.window_mean("repetition", 0, w), self.window_mean("repetition", -w, None)
            if last - first > a.repetition_alarm:
                out.append(f"repetition rate {last:.3f} over the last {w} steps (first {w}: {first:.3f}): "
                           "the policy may be looping")
        previous = [x["kl"] for x in h[-w - 1: -1]]
        if len(previous) == w:  # a full window, so the first steps' growth from KL = 0 is no spike
            median = statistics.median(previous)
            if now["kl"] > max(a.kl_spike * median, 1.0):
                out.append(f"KL spike: {now['kl']:.2f} nats against a median {median:.2f} over the previous "
                           f"{len(previous)} steps")
        if now.get("gold") is not None and len(h) >= 2 * w:
            proxy_then, proxy_now = self.window_mean("score", -2 * w, -w), self.window_mean("score", -w, None)
            gold_then, gold_now = self.window_mean("gold", -2 * w, -w), self.window_mean("gold", -w, None)
            spread = statistics.pstdev([x["gold"] for x in h[-2 * w:]]) / math.sqrt(w)
            if proxy_now > proxy_then and gold_now < gold_then - spread:
                out.append(f"proxy reward rose ({proxy_then:.3f} -> {proxy_now:.3f}) while gold fell "
                           f"({gold_then:.3f} -> {gold_now:.3f}) over the last {2 * w} steps: over-optimisation")
        if now.get("ood_fraction") is not None and now["ood_fraction"] > a.ood_alarm:
            out.append(f"{now['ood_fraction']:.0%} of the samples are off the reward model's training distribution")
        return out

    def observe(self, step: int, texts: list[str], scores: list[float], kl: float, gold: list[float] | None = None,
                ood: torch.Tensor | None = None) -> dict:
        """One RL step: ``texts`` and their proxy ``scores``, the mean per-sequence ``kl``, optional gold
        scores and OOD flags (bool per text). Returns the ``monitor/...`` metrics."""
        lengths = [float(len(words(t))) for t in texts]
        row = {"step": step, "score": sum(scores) / len(scores), "kl": kl, "length_corr": pearson(scores, lengths),
               "repetition": sum(repetition_rate(t) for t in texts) / len(texts),
               "distinct_2": distinct_n(texts, 2)}
        if gold is not None:
            row["gold"] = sum(gold) / len(gold)
        if ood is not None:
            row["ood_fraction"] = ood.float().mean().item()
        self.history.append(row)
        alarms = self.alarms()
        for message in alarms:
            warnings.warn(f"step {step}: {message}", RewardHackingWarning, stacklevel=2)
        if self.run_dir is not None and (alarms or (ood is not None and ood.any())):
            with open(self.run_dir / "alarms.jsonl", "a") as f:
                for message in alarms:
                    f.write(json.dumps({"step": step, "alarm": message}) + "\n")
                for t in ([t for t, o in zip(texts, ood.tolist()) if o][:3] if ood is not None else []):
                    f.write(json.dumps({"step": step, "ood_example": t[:300]}) + "\n")
        metrics = {f"monitor/{k}": v for k, v in row.items() if k not in ("step", "score", "kl")}
        metrics["monitor/alarms"] = len(alarms)
        return metrics


# ---------------------------------------------------------------------------------------------
# out-of-distribution detection


@dataclass
class OODDetector:
    """Mahalanobis distance to the reward model's training features in their principal subspace, with
    a cross-fitted threshold:

        z = P^T (x - mu),   d(x) = sum_j z_j^2 / v_j,   v = (1 - a) lambda + a * mean(lambda)

    ``mu`` is the mean of the training features and the columns of ``P`` their top ``k`` principal
    directions with variances ``lambda``; the shrinkage ``a`` keeps small variances from dominating.
    The threshold is the ``quantile`` of the distances of each text to a detector fitted without its
    fold (``folds``-fold cross-fitting), so about 1 - quantile of in-distribution texts are flagged,
    and the detector itself is fitted on every text. Folds go by group (one prompt's responses stay
    together): the chosen and rejected answers to one prompt are near copies, and splitting them set
    the threshold too low.

    Why a subspace: with a few hundred texts in d = 576 dimensions the trailing directions of the
    covariance are noise, and a full (shrunk) inverse let them decide the distance. Measured on the
    bundled model's features (400 HH responses): full covariance flagged 10-12% of held-out HH
    responses and missed 20-80% of random-token texts; k = 64 flagged about 5% and missed none."""

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor
    threshold: float
    quantile: float
    n_fit: int

    @classmethod
    def fit(cls, features: torch.Tensor, groups: list | None = None, quantile: float = 0.95, folds: int = 5,
            components: int = 64, shrinkage: float = 0.3, seed: int = 0) -> OODDetector:
        x = features.double()
        groups = list(range(len(x))) if groups is None else list(groups)
        names = sorted(set(groups), key=str)
        if len(names) < max(2, folds):
            raise ValueError(f"OOD detector: {len(x)} texts in {len(names)} groups are too few for {folds} folds")
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
        fold_of = {names[j]: i % folds for i, j in enumerate(order)}
        fold = torch.tensor([fold_of[g] for g in groups])
        held_out = [cls._fit(x[fold != f], components, shrinkage, quantile).distance(x[fold == f]) for f in range(folds)]
        det = cls._fit(x, components, shrinkage, quantile)
        det.threshold = torch.quantile(torch.cat(held_out), quantile).item()
        return det

    @classmethod
    def _fit(cls, x: torch.Tensor, components: int, shrinkage: float, quantile: float) -> OODDetector:
        mean = x.mean(0)
        _, s, v = torch.linalg.svd(x - mean, full_matrices=False)
        k = min(components, len(x) - 1, x.shape[1])
        lam = s[:k] ** 2 / (len(x) - 1)
        return cls(mean, v[:k].T.contiguous(), (1 - shrinkage) * lam + shrinkage * lam.mean(), 0.0, quantile, len(x))

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.double() - self.mean) @ self.components
        return (z * z / self.variances).sum(-1)

    def flag(self, features: torch.Tensor) -> torch.Tensor:
        """True where a text is off the training distribution."""
        return self.distance(features) > self.threshold

    def save(self, path: str | Path) -> None:
        torch.save({"mean": self.mean, "components": self.components, "variances": self.variances,
                    "threshold": self.threshold, "quantile": self.quantile, "n_fit": self.n_fit}, path)

    @classmethod
    def load(cls, path: str | Path) -> OODDetector:
        state = torch.load(path, weights_only=True)
        if "components" not in state:
            raise ValueError(f"{path}: an OOD detector from an older rlhfkit (full covariance); "
                             "train the reward model again to refit it")
        return cls(**state)


def ood_texts(records) -> tuple[list, list, list]:
    """(prompts, responses, groups) of reward-model training records: both sides of a preference, every
    response of a ranking, the rated response; ``groups`` holds each response's record index."""
    prompts, responses, groups = [], [], []
    for i, r in enumerate(records):
        for resp in ([r.chosen, r.rejected] if hasattr(r, "chosen") else getattr(r, "responses", None)
                     or [getattr(r, "response", None)]):
            if isinstance(resp, str) and resp:
                prompts.append(r.prompt)
                responses.append(resp)
                groups.append(i)
    return prompts, responses, groups


__all__ = ["Monitor", "MonitorArgs", "OODDetector", "RewardHackingWarning", "distinct_n", "ood_texts",
           "pearson", "sample_stats"]
