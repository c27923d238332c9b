"""What to watch during RL (seed 001; Gao et al. 2022, *Scaling laws for reward model
over-optimization*): the policy games the reward model with longer or repetitive answers, the KL
spikes, the proxy reward rises while the true (gold) objective falls, and samples drift where the
reward model has never seen data, so its scores mean nothing.

* :class:`Monitor` turns each RL step's samples into metrics (``monitor/...`` in metrics.jsonl) and
  raises :class:`RewardHackingWarning` when an alarm fires; every alarm is also appended to the
  run's ``alarms.jsonl``.
* the OOD fraction comes from the reward model's detector (:mod:`rlhfkit.models.ood`), fitted when
  the reward model is trained and saved beside it as ``ood.pt``.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.eval.metrics import distinct_n, pearson
from rlhfkit.rollout.rewards import repetition_rate, words


class RewardHackingWarning(UserWarning):
    """An RL monitor alarm: possible reward hacking, a KL spike or off-distribution samples."""


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


__all__ = ["Monitor", "MonitorArgs", "RewardHackingWarning"]
